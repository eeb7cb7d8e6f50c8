//! Soak: minutes of mixed load (watches that finish, watches that are
//! cancelled, checks, generations, 5% upstream faults) against `sim`, then
//! quiet. Reports RSS, open file descriptors and live tasks of the server
//! at the start, during, at the end of the load and after it, and the calls'
//! outcomes by code. Bounded: it stops by itself after `--duration`.
//!
//! It then sets the share of failed calls of each RPC (and of the HTTP
//! API's seed-style pollers) next to the share of failed upstream calls the
//! simulator counted (`create_failed`, `status_failed`): how much of
//! Piclumen's trouble reaches the callers. `--outage 10s` scripts a total
//! outage of status calls (every one answered 503) in the middle of the
//! load and reports the shares inside it separately.
//!
//! `cargo bench --bench soak -- --duration 10m` (see BENCHMARKS.md).

mod common;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use clap::Parser;
use common::{authed, connect, sim_json, spawn_server, spawn_sim, status_kib, unused_addr};
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
    /// Seed-style callers of the HTTP API (on top of `--workers`): each
    /// creates a job (`POST /generate-image`), then polls it
    /// (`POST /check-image`) once a second until it is done; 0 for none.
    #[arg(long, default_value_t = 10)]
    http_pollers: usize,
    /// Share (0 to 1) of upstream requests the simulator answers with a
    /// random 5xx.
    #[arg(long, default_value_t = 0.03)]
    fail_5xx_rate: f64,
    /// Share (0 to 1) of upstream requests the simulator answers 429.
    #[arg(long, default_value_t = 0.02)]
    fail_429_rate: f64,
    /// A total outage of status calls for this long (`10s`), in the middle
    /// of the load: the simulator answers every one 503, then recovers.
    #[arg(long, value_parser = humantime::parse_duration)]
    outage: Option<Duration>,
    /// Ignored (cargo bench passes --bench).
    #[arg(long)]
    bench: bool,
}

/// Calls, and failed calls, of one RPC.
#[derive(Debug, Default, Clone, Copy)]
struct Share {
    calls: u64,
    failed: u64,
}

impl Share {
    fn percent(self) -> f64 {
        if self.calls == 0 {
            return f64::NAN;
        }
        self.failed as f64 * 100.0 / self.calls as f64
    }
}

/// What the callers met: outcomes by code (gRPC), and calls and failed
/// calls by RPC, over the whole load and inside the outage window.
#[derive(Debug, Default)]
struct Outcomes {
    codes: Mutex<BTreeMap<String, u64>>,
    /// The HTTP API's answers by path and status (`error` when none came).
    http_codes: Mutex<BTreeMap<String, u64>>,
    /// By RPC: [whole load, calls in flight during the outage (started
    /// before its end, ended after its start)].
    shares: Mutex<BTreeMap<&'static str, [Share; 2]>>,
    /// The outage window, once scripted.
    outage: Mutex<Option<(Instant, Instant)>>,
    /// By check path: the oldest state answered (`observed_at` over gRPC,
    /// `Age` over HTTP), and answers without an age.
    oldest: Mutex<BTreeMap<&'static str, (Duration, u64)>>,
}

/// Notes the age of a state a check answered (`None`: no age given).
fn age(codes: &Codes, rpc: &'static str, age: Option<Duration>) {
    let mut oldest = codes.oldest.lock().expect("oldest");
    let entry = oldest.entry(rpc).or_default();
    match age {
        Some(age) => entry.0 = entry.0.max(age),
        None => entry.1 += 1,
    }
}

type Codes = Arc<Outcomes>;

/// The RPC names of the per-RPC lines, in their order, with the upstream
/// endpoint each one's calls depend on.
const RPCS: [(&str, &str); 5] = [
    ("GenerateImage", "create"),
    ("CheckImage", "status"),
    ("WatchImage", "status"),
    ("HTTP /generate-image", "create"),
    ("HTTP /check-image", "status"),
];

fn count(codes: &Codes, rpc: &str, code: tonic::Code) {
    *codes
        .codes
        .lock()
        .expect("codes")
        .entry(format!("{rpc} {code:?}"))
        .or_default() += 1;
}

/// One call of `rpc`, made at `started`, ended, failed or not.
fn tally(codes: &Codes, rpc: &'static str, started: Instant, failed: bool) {
    let now = Instant::now();
    let inside = codes
        .outage
        .lock()
        .expect("outage")
        .is_some_and(|(from, to)| started < to && now >= from);
    let mut shares = codes.shares.lock().expect("shares");
    let entry = shares.entry(rpc).or_default();
    for share in if inside {
        &mut entry[..]
    } else {
        &mut entry[..1]
    } {
        share.calls += 1;
        share.failed += u64::from(failed);
    }
}

/// [`tally`] of an HTTP call to `path` that got `status` (or no answer),
/// also counted by status.
fn tally_http(
    codes: &Codes,
    path: &'static str,
    started: Instant,
    status: Option<u16>,
    failed: bool,
) {
    let status = status.map_or_else(|| "error".to_owned(), |s| s.to_string());
    *codes
        .http_codes
        .lock()
        .expect("http codes")
        .entry(format!("{path} {status}"))
        .or_default() += 1;
    tally(codes, path, started, failed);
}

/// [`count`] and [`tally`] of a gRPC call.
fn record(codes: &Codes, rpc: &'static str, started: Instant, code: tonic::Code) {
    count(codes, rpc, code);
    tally(codes, rpc, started, code != tonic::Code::Ok);
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
        let started = Instant::now();
        let mark_id = match client.generate_image(authed(&token, request)).await {
            Ok(r) => {
                record(&codes, "GenerateImage", started, tonic::Code::Ok);
                r.into_inner().mark_id
            }
            Err(s) => {
                record(&codes, "GenerateImage", started, s.code());
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
                            ..Default::default()
                        },
                    );
                    let started = Instant::now();
                    let answer = client.check_image(request).await;
                    if let Ok(answer) = &answer {
                        let observed = answer.get_ref().job.as_ref().and_then(|j| j.observed_at);
                        let since = observed
                            .and_then(|t| std::time::SystemTime::try_from(t).ok())
                            .map(|t| t.elapsed().unwrap_or_default());
                        age(&codes, "CheckImage", since);
                    }
                    let code = answer.map_or_else(|s| s.code(), |_| tonic::Code::Ok);
                    record(&codes, "CheckImage", started, code);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
            // A watch the caller abandons half-way.
            2 => {
                let request = authed(&token, pb::WatchImageRequest { mark_id });
                let started = Instant::now();
                match client.watch_image(request).await {
                    Ok(r) => {
                        let mut stream = r.into_inner();
                        let first =
                            tokio::time::timeout(Duration::from_secs(1), stream.message()).await;
                        count(&codes, "WatchImage cancelled", tonic::Code::Ok);
                        tally(&codes, "WatchImage", started, matches!(first, Ok(Err(_))));
                    }
                    Err(_) => tally(&codes, "WatchImage", started, true),
                }
            }
            // Most watch to the end.
            _ => {
                let request = authed(&token, pb::WatchImageRequest { mark_id });
                let started = Instant::now();
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
                record(&codes, "WatchImage", started, code);
            }
        }
    }
}

/// Most `/check-image` polls of one job.
const MAX_POLLS: u32 = 60;

/// A caller of the first version's HTTP API at `api`, as its seed client
/// did: create a job, then poll it once a second until it is done (200),
/// failed (500) or [`MAX_POLLS`] polls. Anything but 200 or 202 is a failed
/// call; a failed poll is followed by the next one a second later.
async fn http_poller(http: reqwest::Client, api: String, id: usize, until: Instant, codes: Codes) {
    let token = format!("soak-token-{}", id % 10);
    let run: u32 = rand::random();
    let mut n = 0u64;
    while Instant::now() < until {
        n += 1;
        let body = serde_json::json!({ "prompt": format!("soak http {run:08x} {id} {n}") });
        let started = Instant::now();
        let created = http
            .post(format!("{api}/generate-image?authorization_token={token}"))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await;
        let status = created.as_ref().ok().map(|r| r.status().as_u16());
        let mark_id = match created {
            Ok(r) if r.status() == reqwest::StatusCode::OK => {
                let body = r.bytes().await.unwrap_or_default();
                let reply: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                reply["mark_id"].as_str().map(str::to_owned)
            }
            _ => None,
        };
        tally_http(
            &codes,
            "HTTP /generate-image",
            started,
            status,
            mark_id.is_none(),
        );
        let Some(mark_id) = mark_id else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        for _ in 0..MAX_POLLS {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let started = Instant::now();
            let status = http
                .post(format!(
                    "{api}/check-image?authorization_token={token}&mark_id={mark_id}"
                ))
                .send()
                .await
                .ok();
            if let Some(response) = status.as_ref().filter(|r| r.status().is_success()) {
                let seconds = response
                    .headers()
                    .get("age")
                    .and_then(|v| v.to_str().ok()?.parse().ok());
                age(
                    &codes,
                    "HTTP /check-image",
                    seconds.map(Duration::from_secs),
                );
            }
            let status = status.map(|r| r.status().as_u16());
            tally_http(
                &codes,
                "HTTP /check-image",
                started,
                status,
                !matches!(status, Some(200 | 202)),
            );
            if matches!(status, Some(200 | 500)) || Instant::now() >= until {
                break;
            }
        }
    }
}

/// Quiet time after load: pollers retire within a round; idle upstream
/// connections close after 30 s.
const QUIET: Duration = Duration::from_secs(40);

/// The load's shape: gRPC workers and HTTP pollers.
struct Load<'a> {
    clients: &'a [ImageServiceClient<Channel>],
    workers: usize,
    http: &'a reqwest::Client,
    /// The HTTP API's base URL.
    api: &'a str,
    http_pollers: usize,
}

async fn run_load(load: &Load<'_>, duration: Duration, codes: &Codes) {
    let until = Instant::now() + duration;
    let mut tasks: Vec<_> = (0..load.workers)
        .map(|i| {
            tokio::spawn(worker(
                load.clients[i % load.clients.len()].clone(),
                i,
                until,
                codes.clone(),
            ))
        })
        .collect();
    tasks.extend((0..load.http_pollers).map(|i| {
        tokio::spawn(http_poller(
            load.http.clone(),
            load.api.to_owned(),
            i,
            until,
            codes.clone(),
        ))
    }));
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

/// The simulator's counters that the shares are made of.
#[derive(Debug, Clone, Copy)]
struct Upstream {
    create_calls: u64,
    create_failed: u64,
    status_calls: u64,
    status_failed: u64,
}

impl Upstream {
    async fn read(http: &reqwest::Client, sim: &str) -> Self {
        let stats = sim_json(http, sim, "/_sim/stats").await;
        let n = |key: &str| stats[key].as_u64().unwrap_or(0);
        Self {
            create_calls: n("create_calls"),
            create_failed: n("create_failed"),
            status_calls: n("status_calls"),
            status_failed: n("status_failed"),
        }
    }

    /// The upstream share of failed calls of `endpoint` from `self` to
    /// `later`.
    fn share(self, later: Self, endpoint: &str) -> Share {
        let (calls, failed) = match endpoint {
            "create" => (
                later.create_calls - self.create_calls,
                later.create_failed - self.create_failed,
            ),
            _ => (
                later.status_calls - self.status_calls,
                later.status_failed - self.status_failed,
            ),
        };
        Share { calls, failed }
    }
}

/// One line per RPC: its share of failed calls, the upstream share its
/// calls depend on, and their ratio.
fn print_shares(
    prefix: &str,
    shares: &BTreeMap<&str, [Share; 2]>,
    which: usize,
    up: [Upstream; 2],
) {
    for (rpc, endpoint) in RPCS {
        let Some(share) = shares.get(rpc).map(|s| s[which]) else {
            continue;
        };
        let upstream = up[0].share(up[1], endpoint).percent();
        let amplification = share.percent() / upstream;
        let amplification = if amplification.is_finite() {
            format!("{amplification:.2}")
        } else {
            "n/a".to_owned()
        };
        let percent = |p: f64| {
            if p.is_nan() {
                "n/a".to_owned()
            } else {
                format!("{p:.2}%")
            }
        };
        println!(
            "{prefix}failed {rpc}: {} of {} calls (upstream {endpoint} calls failed: {}), amplification {amplification}",
            percent(share.percent()),
            share.calls,
            percent(upstream),
        );
    }
}

/// Scripts the outage in the middle of a load of `duration` that started
/// at `started`; returns its start (from `started`) and the simulator's
/// counters at both ends of it.
async fn outage(
    http: reqwest::Client,
    sim: String,
    started: Instant,
    duration: Duration,
    outage: Duration,
    codes: Codes,
) -> (Duration, [Upstream; 2]) {
    let offset = (duration / 2).saturating_sub(outage / 2);
    tokio::time::sleep_until((started + offset).into()).await;
    let before = Upstream::read(&http, &sim).await;
    let fault = serde_json::json!([{
        "endpoint": "status",
        "http_status": 503,
        "body": "outage (simulated)",
        "duration_ms": outage.as_millis() as u64,
    }]);
    let reply = http
        .post(format!("http://{sim}/_sim/faults"))
        .body(fault.to_string())
        .send()
        .await
        .expect("sim faults");
    assert!(reply.status().is_success(), "outage scripted: {reply:?}");
    let from = Instant::now();
    *codes.outage.lock().expect("outage") = Some((from, from + outage));
    tokio::time::sleep_until((from + outage).into()).await;
    let after = Upstream::read(&http, &sim).await;
    (from - started, [before, after])
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let (fail_5xx, fail_429) = (
        args.fail_5xx_rate.to_string(),
        args.fail_429_rate.to_string(),
    );
    let sim = spawn_sim(&[
        "--job-duration",
        "4s",
        "--job-jitter",
        "0.5",
        "--fail-5xx-rate",
        &fail_5xx,
        "--fail-429-rate",
        &fail_429,
    ]);
    let metrics = unused_addr().to_string();
    let http_api = unused_addr().to_string();
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
            "--http-listen",
            &http_api,
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
    let api = format!("http://{http_api}");
    let load = Load {
        clients: &clients,
        workers: args.workers,
        http: &http,
        api: &api,
        http_pollers: args.http_pollers,
    };
    // Warm-up: allocator arenas, connection pools and buffers reach their
    // working size; the baseline is taken in the quiet after it.
    let warmup = (args.duration / 10).min(Duration::from_secs(30));
    run_load(&load, warmup, &codes).await;
    tokio::time::sleep(QUIET).await;
    report("baseline", tasks(&http, &metrics).await);
    let (rss0, fds0, tasks0) = (
        status_kib(pid, "VmRSS:"),
        fds(pid),
        tasks(&http, &metrics).await,
    );

    codes.codes.lock().expect("codes").clear();
    codes.shares.lock().expect("shares").clear();
    codes.http_codes.lock().expect("http codes").clear();
    let upstream0 = Upstream::read(&http, &sim.addr).await;
    let started = Instant::now();
    let scripted = args.outage.map(|length| {
        tokio::spawn(outage(
            http.clone(),
            sim.addr.clone(),
            started,
            args.duration,
            length,
            codes.clone(),
        ))
    });
    let running = run_load(&load, args.duration, &codes);
    tokio::pin!(running);
    loop {
        tokio::select! {
            () = &mut running => break,
            () = tokio::time::sleep(Duration::from_secs(60)) => {
                report(&format!("t+{}s", started.elapsed().as_secs()), tasks(&http, &metrics).await);
            }
        }
    }
    let upstream1 = Upstream::read(&http, &sim.addr).await;
    report("load ended", tasks(&http, &metrics).await);
    tokio::time::sleep(QUIET).await;
    let tasks1 = tasks(&http, &metrics).await;
    report("after", tasks1);
    let (rss1, fds1) = (status_kib(pid, "VmRSS:"), fds(pid));
    println!("outcomes by code:");
    for (key, n) in codes.codes.lock().expect("codes").iter() {
        println!("  {key}: {n}");
    }
    println!(
        "after vs baseline: RSS {:+.1} MiB, fds {:+}, live tasks {:+}",
        (rss1 as f64 - rss0 as f64) / 1024.0,
        fds1 as i64 - fds0 as i64,
        tasks1 - tasks0
    );
    let shares = codes.shares.lock().expect("shares").clone();
    let (create, status) = (
        upstream0.share(upstream1, "create"),
        upstream0.share(upstream1, "status"),
    );
    println!(
        "upstream failed: {} of {} create calls, {} of {} status calls",
        create.failed, create.calls, status.failed, status.calls
    );
    print_shares("", &shares, 0, [upstream0, upstream1]);
    let http_codes = codes.http_codes.lock().expect("http codes").clone();
    if !http_codes.is_empty() {
        println!("HTTP outcomes by status:");
        for (key, n) in &http_codes {
            println!("  {key}: {n}");
        }
    }
    for (rpc, (oldest, unaged)) in codes.oldest.lock().expect("oldest").iter() {
        println!(
            "oldest state answered by {rpc}: {:.1}s ({unaged} answers without an age)",
            oldest.as_secs_f64()
        );
    }
    if let (Some(scripted), Some(length)) = (scripted, args.outage) {
        let (from, window) = scripted.await.expect("outage");
        println!(
            "outage: every status call answered 503 from t+{:.1}s to t+{:.1}s",
            from.as_secs_f64(),
            (from + length).as_secs_f64()
        );
        println!("calls in flight during the outage:");
        print_shares("in outage, ", &shares, 1, window);
    }
}
