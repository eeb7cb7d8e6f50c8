//! Helpers shared by the benchmarks: child processes of our binary
//! (started by the tests' own helper, `tests/common/process.rs`), clients
//! of them, the simulator's figures, and resource use, read from /proc.
#![allow(dead_code, unreachable_pub)]

#[path = "../../tests/common/process.rs"]
pub mod process;

use piclumen_grpc::pb::{JobState, image_service_client::ImageServiceClient};
use tonic::{Request, transport::Channel};

pub use process::Process;

/// The log settings of every child: info from our crate, warnings from
/// the rest.
const LOG: (&str, &str) = ("PICLUMEN_LOG", "warn,piclumen_grpc=info");

/// Starts the binary with `args` (logging as [`LOG`] says) and waits for
/// its `listening on` line.
pub fn spawn(args: &[&str]) -> Process {
    Process::start(args, &[LOG])
}

/// Starts `sim` on a free loopback port with `extra` flags.
pub fn spawn_sim(extra: &[&str]) -> Process {
    spawn(&[&["sim", "--listen", "127.0.0.1:0"][..], extra].concat())
}

/// Starts `serve` on a free loopback port against the simulator at
/// `sim_addr`, with `extra` flags.
pub fn spawn_server(sim_addr: &str, extra: &[&str]) -> Process {
    Process::serve_against(&format!("http://{sim_addr}"), extra, &[LOG])
}

/// A gRPC client over a new connection to the server at `addr`.
pub async fn connect(addr: &str) -> ImageServiceClient<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    ImageServiceClient::new(channel)
}

/// A request carrying `authorization: Bearer <token>`.
pub fn authed<T>(token: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii"),
    );
    request
}

/// The simulator's JSON at `path` (`/_sim/stats`, `/_sim/jobs`).
pub async fn sim_json(http: &reqwest::Client, sim: &str, path: &str) -> serde_json::Value {
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

pub fn unix_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// The `p` quantile (0 to 1) of sorted figures; NaN when there are none.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// The share of a job's duration, from its creation, at which the
/// simulator switches it to `state`: running at 40%, succeeded at 100%.
pub fn change_share(state: JobState) -> Option<f64> {
    match state {
        JobState::Running => Some(0.4),
        JobState::Succeeded => Some(1.0),
        _ => None,
    }
}

/// Milliseconds from the simulator's change of job `id` (at `share` of its
/// duration) to its delivery at `received_ms`, from `jobs` (the simulator's
/// `/_sim/jobs`).
pub fn lag_ms(jobs: &serde_json::Value, id: &str, share: f64, received_ms: f64) -> Option<f64> {
    let job = &jobs[id];
    let at = job["created_unix_ms"].as_f64()? + job["duration_ms"].as_f64()? * share;
    Some(received_ms - at)
}

/// A `/proc/PID/status` figure in KiB (`VmRSS`, `VmHWM`).
pub fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// (peak RSS in KiB, CPU seconds) of a process, from /proc.
pub fn usage(pid: u32) -> (u64, f64) {
    let hwm = status_kib(pid, "VmHWM:");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = fields.get(11..13).map_or(0.0, |f| {
        f.iter().filter_map(|v| v.parse::<f64>().ok()).sum()
    });
    (hwm, ticks / 100.0) // USER_HZ is 100 on Linux
}

/// A loopback address that was just free (as the tests' own helper, which
/// `tests/support/redis_server.rs` also finds here).
pub fn unused_addr() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr")
}
