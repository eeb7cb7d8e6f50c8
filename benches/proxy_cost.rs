//! What a call costs us, against the plain-proxy floor (`examples/floor.rs`)
//! measured in the same run: req/s, latency, errors by gRPC code, server CPU
//! per call (from `/proc`) and upstream calls per call, for
//! GenerateImage, CheckImage on one job, CheckImage over many jobs and
//! tokens, and CheckImage one at a time.
//!
//! Run through `scripts/bench.sh` (which builds the release binaries). The
//! server under test is pinned to core 0 with one tokio worker; this
//! process (the load, over raw HTTP/2) and the simulator run on core 1.
//! Each run gives ours and the floor the same seconds of load, in
//! alternating slices of at most a second (ours, floor, floor, ours, ...),
//! so that both meet the same moments of a noisy host. A scenario's figures
//! are those of its median run, ranked by the run's own req/s ratio, so
//! both rows and both ratios come from one pair that met the same moments.
//! Server CPU is read from each thread's `schedstat`.
//!
//! Flags: `--seconds N` (per run, default 6), `--runs N` (default 3),
//! `--floor PATH` (the floor binary), `--only SCENARIO` (a prefix of its
//! name), `--server-args "FLAGS"` (extra `serve` flags), `--wrap "CMD"` (a
//! prefix for our server's command, e.g. `perf record -g --`). With
//! `PROXY_COST_EACH_RUN` set, each run's pair is printed on stderr.

#[path = "common/mod.rs"]
mod common;

use std::{
    collections::BTreeMap,
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::{
    Process,
    process::{self, BIN},
    spawn_sim, usage,
};
use piclumen_grpc::pb;
use prost::Message;
use tokio::net::TcpStream;

#[derive(Debug, Clone)]
struct Opts {
    seconds: f64,
    runs: usize,
    floor: String,
    only: Option<String>,
    /// Extra `serve` flags, space-separated (for experiments).
    server_args: Vec<String>,
    /// A command prefix for our server, e.g. `perf record -g --`.
    wrap: Vec<String>,
}

fn opts() -> Opts {
    let mut o = Opts {
        seconds: 6.0,
        runs: 3,
        floor: format!(
            "{}/target/release/examples/floor",
            env!("CARGO_MANIFEST_DIR")
        ),
        only: None,
        server_args: Vec::new(),
        wrap: Vec::new(),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let value = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--seconds" => o.seconds = value.parse().expect("--seconds"),
            "--runs" => o.runs = value.parse().expect("--runs"),
            "--floor" => o.floor = value,
            "--only" => o.only = Some(value),
            "--server-args" => o.server_args = value.split_whitespace().map(String::from).collect(),
            "--wrap" => o.wrap = value.split_whitespace().map(String::from).collect(),
            // cargo bench passes --bench.
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    o
}

/// Runs `program` pinned to `cpu` when taskset exists, in the clean
/// environment of `common::process`.
fn pinned(cpu: &str, program: &str) -> Command {
    if Command::new("taskset")
        .arg("-V")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        let mut c = process::program("taskset");
        c.args(["-c", cpu, program]);
        c
    } else {
        process::program(program)
    }
}

fn start_pinned(wrap: &[String], program: &str, args: &[&str]) -> Process {
    let mut cmd = match wrap.split_first() {
        Some((first, rest)) => {
            let mut c = pinned("0", first);
            c.args(rest).arg(program);
            c
        }
        None => pinned("0", program),
    };
    // Info logging on, as in production (a `--log` in --server-args wins).
    cmd.args(args)
        .env("TOKIO_WORKER_THREADS", "1")
        .env("PICLUMEN_LOG", "info");
    Process::spawn(cmd)
}

/// One scenario: which RPC, how many connections and streams, which tokens
/// and jobs.
#[derive(Debug, Clone)]
struct Scenario {
    name: &'static str,
    path: &'static str,
    connections: usize,
    streams: usize,
    /// Request bodies (gRPC-framed) with their token, cycled per stream.
    requests: Arc<Vec<(String, Bytes)>>,
}

#[derive(Debug, Default, Clone)]
struct Outcome {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    codes: BTreeMap<String, u64>,
    cpu_us: f64,
    upstream_per_call: f64,
}

fn frame(message: &impl Message) -> Bytes {
    let body = message.encode_to_vec();
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(0);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out.into()
}

/// Drives `scenario` against `addr` for `seconds`, taking its requests from
/// the `start`th on (so slices go on where the last one stopped); returns
/// per-call latencies (microseconds) and grpc-status counts.
async fn load(
    addr: &str,
    scenario: &Scenario,
    seconds: f64,
    start: usize,
) -> (Vec<u32>, BTreeMap<String, u64>) {
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..scenario.connections {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.set_nodelay(true).expect("nodelay");
        let (client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
        tokio::spawn(conn);
        for s in 0..scenario.streams {
            let mut client = client.clone();
            let scenario = scenario.clone();
            let uri = format!("http://{addr}{}", scenario.path);
            tasks.spawn(async move {
                let mut latencies = Vec::new();
                let mut codes: BTreeMap<String, u64> = BTreeMap::new();
                let mut n = start + c * scenario.streams + s;
                while Instant::now() < end {
                    let (token, body) = &scenario.requests[n % scenario.requests.len()];
                    n += scenario.connections * scenario.streams;
                    let request = http::Request::post(&uri)
                        .header("content-type", "application/grpc")
                        .header("te", "trailers")
                        .header("authorization", format!("Bearer {token}"))
                        .body(())
                        .expect("request");
                    let started = Instant::now();
                    client = client.ready().await.expect("ready");
                    let (response, mut send) = client.send_request(request, false).expect("send");
                    send.send_data(body.clone(), true).expect("data");
                    let code = match response.await {
                        Ok(response) => {
                            let (parts, mut body) = response.into_parts();
                            while let Some(chunk) = body.data().await {
                                let chunk = chunk.expect("body");
                                let _ = body.flow_control().release_capacity(chunk.len());
                            }
                            let trailers = body.trailers().await.ok().flatten();
                            trailers
                                .as_ref()
                                .and_then(|t| t.get("grpc-status"))
                                .or_else(|| parts.headers.get("grpc-status"))
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("none")
                                .to_owned()
                        }
                        Err(e) => format!("h2: {e}"),
                    };
                    latencies.push(started.elapsed().as_micros() as u32);
                    *codes.entry(code_name(&code)).or_default() += 1;
                }
                (latencies, codes)
            });
        }
    }
    let mut all = Vec::new();
    let mut codes = BTreeMap::new();
    while let Some(done) = tasks.join_next().await {
        let (l, c) = done.expect("load task");
        all.extend(l);
        for (k, v) in c {
            *codes.entry(k).or_default() += v;
        }
    }
    (all, codes)
}

fn code_name(code: &str) -> String {
    code.parse::<usize>()
        .ok()
        .and_then(|n| piclumen_grpc::grpc_metrics::CODE_NAMES.get(n))
        .map_or_else(|| code.to_owned(), |n| (*n).to_owned())
}

async fn sim_counters(sim: &str) -> u64 {
    let body = reqwest::get(format!("http://{sim}/_sim/stats"))
        .await
        .expect("stats")
        .bytes()
        .await
        .expect("stats body");
    let stats: serde_json::Value = serde_json::from_slice(&body).expect("stats json");
    stats["create_calls"].as_u64().unwrap_or(0) + stats["status_calls"].as_u64().unwrap_or(0)
}

/// CPU time of every thread of `pid`, in seconds: from each thread's
/// `schedstat` (nanoseconds), else `/proc/PID/stat` (10 ms ticks, too
/// coarse for one-second slices).
fn cpu_seconds(pid: u32) -> f64 {
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"));
    let nanos: Option<u64> = threads.ok().and_then(|threads| {
        threads
            .map(|t| {
                let path = t.ok()?.path().join("schedstat");
                let text = std::fs::read_to_string(path).ok()?;
                text.split_whitespace().next()?.parse::<u64>().ok()
            })
            .sum()
    });
    nanos.map_or_else(|| usage(pid).1, |n| n as f64 / 1e9)
}

/// What one side measured over its slices of a run, summed.
#[derive(Debug, Default)]
struct Tally {
    latencies: Vec<u32>,
    codes: BTreeMap<String, u64>,
    elapsed: f64,
    cpu: f64,
    upstream: u64,
    /// Requests sent so far, warm-up included: where the next slice starts.
    sent: usize,
}

impl Tally {
    async fn slice(&mut self, target: &Process, sim: &str, scenario: &Scenario, seconds: f64) {
        let cpu0 = cpu_seconds(target.pid());
        let up0 = sim_counters(sim).await;
        let started = Instant::now();
        let (latencies, codes) = load(&target.addr, scenario, seconds, self.sent).await;
        self.sent += latencies.len();
        self.elapsed += started.elapsed().as_secs_f64();
        self.cpu += cpu_seconds(target.pid()) - cpu0;
        self.upstream += sim_counters(sim).await - up0;
        self.latencies.extend(latencies);
        for (code, n) in codes {
            *self.codes.entry(code).or_default() += n;
        }
    }

    fn outcome(mut self) -> Outcome {
        self.latencies.sort_unstable();
        let latencies = &self.latencies;
        let calls = latencies.len() as u64;
        let pct = |p: f64| {
            latencies
                .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
                .map_or(0.0, |us| f64::from(*us) / 1000.0)
        };
        Outcome {
            rps: calls as f64 / self.elapsed.max(1e-9),
            p50_ms: pct(0.50),
            p99_ms: pct(0.99),
            codes: self.codes,
            cpu_us: self.cpu * 1e6 / calls.max(1) as f64,
            upstream_per_call: self.upstream as f64 / calls.max(1) as f64,
        }
    }
}

/// Longest slice of load one side gets before the other takes its turn.
const SLICE_SECONDS: f64 = 1.0;

/// One run: `seconds` of load on each of `ours` and `floor`, in alternating
/// slices of at most a second (ours, floor, floor, ours, ...), so both
/// sides meet the same moments of a noisy host; a side's figures sum its
/// slices.
async fn measure_pair(
    ours: &Process,
    floor: &Process,
    sim: &str,
    scenario: &Scenario,
    seconds: f64,
) -> (Outcome, Outcome) {
    let (mut a, mut b) = (Tally::default(), Tally::default());
    // Warm up: connections, pools, caches.
    for (target, tally) in [(ours, &mut a), (floor, &mut b)] {
        tally.sent = load(&target.addr, scenario, 0.5, 0).await.0.len();
    }
    let slices = (seconds / SLICE_SECONDS).ceil().max(1.0) as usize;
    let slice = seconds / slices as f64;
    for i in 0..slices {
        let order = if i % 2 == 0 {
            [(ours, &mut a), (floor, &mut b)]
        } else {
            [(floor, &mut b), (ours, &mut a)]
        };
        for (target, tally) in order {
            tally.slice(target, sim, scenario, slice).await;
        }
    }
    (a.outcome(), b.outcome())
}

/// The run whose ours-to-floor req/s ratio is the median. Each side's
/// median on its own could pair a fast moment of one with a slow moment
/// of the other, the very mismatch the slices are there to avoid.
fn median_pair(mut runs: Vec<(Outcome, Outcome)>) -> (Outcome, Outcome) {
    let ratio = |(ours, floor): &(Outcome, Outcome)| ours.rps / floor.rps.max(1e-9);
    runs.sort_by(|a, b| ratio(a).total_cmp(&ratio(b)));
    runs.swap_remove(runs.len() / 2)
}

/// Creates `jobs` jobs for each token directly at the simulator.
async fn seed_jobs(sim: &str, tokens: &[String], jobs: usize) -> Vec<(String, String)> {
    let http = reqwest::Client::new();
    let mut out = Vec::new();
    for token in tokens {
        for i in 0..jobs {
            let body = http
                .post(format!("http://{sim}/api/gen/create"))
                .header("authorization", token)
                .header("content-type", "application/json")
                .body(serde_json::json!({"prompt": format!("bench {i}")}).to_string())
                .send()
                .await
                .expect("create")
                .bytes()
                .await
                .expect("create body");
            let reply: serde_json::Value = serde_json::from_slice(&body).expect("create json");
            let id = reply["data"]["markId"].as_str().expect("markId").to_owned();
            out.push((token.clone(), id));
        }
    }
    out
}

fn checks(jobs: &[(String, String)]) -> Arc<Vec<(String, Bytes)>> {
    Arc::new(
        jobs.iter()
            .map(|(token, id)| {
                let message = pb::CheckImageRequest {
                    mark_id: id.clone(),
                    ..Default::default()
                };
                (token.clone(), frame(&message))
            })
            .collect(),
    )
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let o = opts();
    let job_duration = "100000s";
    // An instant upstream for the per-call cost, one with 20 ms for sharing.
    let instant_sim = spawn_sim(&["--job-duration", job_duration]);
    let slow_sim = spawn_sim(&["--job-duration", job_duration, "--latency", "20ms"]);
    let serve = |sim: &str| {
        let upstream = format!("http://{sim}");
        let mut args = process::serve_args(&upstream, &["--max-generates-per-token", "1000"]);
        args.extend(o.server_args.iter().map(String::as_str));
        start_pinned(&o.wrap, BIN, &args)
    };
    let floor = |sim: &str| start_pinned(&[], &o.floor, &["127.0.0.1:0", &format!("http://{sim}")]);

    let generate = pb::GenerateImageRequest {
        prompt: "a magical landscape".into(),
        ..Default::default()
    };
    let tokens: Vec<String> = (0..4).map(|i| format!("bench-token-{i}")).collect();
    let one_job = seed_jobs(&instant_sim.addr, &tokens[..1], 1).await;
    let many_jobs = seed_jobs(&slow_sim.addr, &tokens, 120).await;
    let scenarios: Vec<(Scenario, &Process)> = vec![
        (
            Scenario {
                name: "GenerateImage",
                path: "/piclumen.v1.ImageService/GenerateImage",
                connections: 16,
                streams: 10,
                requests: Arc::new(
                    (0..16)
                        .map(|i| (format!("gen-token-{i}"), frame(&generate)))
                        .collect(),
                ),
            },
            &instant_sim,
        ),
        (
            Scenario {
                name: "CheckImage, 160 callers, one job",
                path: "/piclumen.v1.ImageService/CheckImage",
                connections: 16,
                streams: 10,
                requests: checks(&one_job),
            },
            &instant_sim,
        ),
        (
            Scenario {
                name: "CheckImage, 150 in flight, 480 jobs of 4 tokens, 20 ms upstream",
                path: "/piclumen.v1.ImageService/CheckImage",
                connections: 15,
                streams: 10,
                requests: checks(&many_jobs),
            },
            &slow_sim,
        ),
        (
            Scenario {
                name: "CheckImage, 150 in flight, 120 jobs of one token, 20 ms upstream",
                path: "/piclumen.v1.ImageService/CheckImage",
                connections: 15,
                streams: 10,
                requests: checks(&many_jobs[..120]),
            },
            &slow_sim,
        ),
        (
            Scenario {
                name: "CheckImage, one at a time, 20 ms upstream",
                path: "/piclumen.v1.ImageService/CheckImage",
                connections: 1,
                streams: 1,
                requests: checks(&many_jobs),
            },
            &slow_sim,
        ),
    ];

    println!(
        "proxy_cost: {} s per run, median of {} alternating runs; server pinned to core 0 with one tokio worker",
        o.seconds, o.runs
    );
    println!(
        "| scenario | server | req/s | p50 ms | p99 ms | codes | CPU us/call | upstream calls/call |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    let mut ratios = Vec::new();
    for (scenario, sim) in &scenarios {
        if o.only
            .as_deref()
            .is_some_and(|only| !scenario.name.starts_with(only))
        {
            continue;
        }
        let ours_proc = serve(&sim.addr);
        let floor_proc = floor(&sim.addr);
        let mut runs = Vec::new();
        for _ in 0..o.runs {
            let (a, b) =
                measure_pair(&ours_proc, &floor_proc, &sim.addr, scenario, o.seconds).await;
            if std::env::var_os("PROXY_COST_EACH_RUN").is_some() {
                eprintln!(
                    "run: ours {:.0} req/s {:.1} us/call | floor {:.0} req/s {:.1} us/call",
                    a.rps, a.cpu_us, b.rps, b.cpu_us
                );
            }
            runs.push((a, b));
        }
        if !o.wrap.is_empty() {
            // Let a wrapping profiler finish its file before the kill.
            ours_proc.signal("INT");
            std::thread::sleep(Duration::from_secs(5));
        }
        let (ours, floor) = median_pair(runs);
        for (label, r) in [("piclumen-grpc", &ours), ("floor", &floor)] {
            println!(
                "| {} | {label} | {:.0} | {:.2} | {:.2} | {:?} | {:.1} | {:.3} |",
                scenario.name, r.rps, r.p50_ms, r.p99_ms, r.codes, r.cpu_us, r.upstream_per_call
            );
        }
        ratios.push(format!(
            "{}: {:.2}x the floor's req/s at {:.2}x its CPU per call; {:.3} upstream calls per call (floor {:.3})",
            scenario.name,
            ours.rps / floor.rps.max(1e-9),
            ours.cpu_us / floor.cpu_us.max(1e-9),
            ours.upstream_per_call,
            floor.upstream_per_call
        ));
    }
    for line in ratios {
        println!("{line}");
    }
}
