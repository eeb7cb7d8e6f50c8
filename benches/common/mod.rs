//! Helpers shared by the benchmarks: child processes of our binary and
//! their resource use, read from /proc.
#![allow(dead_code, unreachable_pub)]

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
};

const BIN: &str = env!("CARGO_BIN_EXE_piclumen-grpc");

/// A child process and the address it listens on; killed when dropped.
pub struct Proc(pub Child, pub String);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the binary and waits for its `listening on` line.
pub fn spawn(args: &[&str]) -> Proc {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .env("PICLUMEN_LOG", "warn,piclumen_grpc=info");
    spawn_command(command)
}

/// Starts `command` and waits for its `listening on` line on stderr.
pub fn spawn_command(mut command: Command) -> Proc {
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines.next().expect("process exited").expect("read");
        if let Some(rest) = line.split("listening on ").nth(1) {
            break rest.split_whitespace().next().expect("addr").to_owned();
        }
    };
    // Keep draining stderr so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Proc(child, addr)
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
pub fn spawn_server(sim_addr: &str, extra: &[&str]) -> Proc {
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
