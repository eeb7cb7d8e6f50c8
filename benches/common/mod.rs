//! Helpers shared by the benchmarks: child processes of our binary
//! (started by the tests' own helper, `tests/common/process.rs`) and their
//! resource use, read from /proc.
#![allow(dead_code, unreachable_pub)]

#[path = "../../tests/common/process.rs"]
pub mod process;

pub use process::{Process, command};

/// Starts the binary with `args` (info logging from our crate, warnings
/// from the rest) and waits for its `listening on` line.
pub fn spawn(args: &[&str]) -> Process {
    let mut command = command(args);
    command.env("PICLUMEN_LOG", "warn,piclumen_grpc=info");
    Process::spawn(command)
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

/// Starts `serve` on a free loopback port against the simulator at
/// `sim_addr`, with `extra` flags.
pub fn spawn_server(sim_addr: &str, extra: &[&str]) -> Process {
    let upstream = format!("http://{sim_addr}");
    let mut args = vec![
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--upstream-url",
        &upstream,
    ];
    args.extend_from_slice(extra);
    spawn(&args)
}

/// A loopback address that was just free.
pub fn unused_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").to_string()
}
