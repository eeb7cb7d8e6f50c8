//! The one way tests and benchmarks run the `piclumen-grpc` binary: a clean
//! environment (nothing inherited from the shell that runs the suite can
//! change a setting), stderr captured into a shared log, the address read
//! from the `listening on ADDR` line whether the log is text or JSON, every
//! wait bounded, and the child killed and reaped when dropped.
//!
//! Benchmarks include this file by path (`benches/common/mod.rs`), so it
//! depends on nothing from the test harness.
#![allow(dead_code, unreachable_pub)]

use std::{
    ffi::OsStr,
    io::{BufRead, BufReader, Read},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::Value;

/// The binary under test, as cargo built it for this test or benchmark.
pub const BIN: &str = env!("CARGO_BIN_EXE_piclumen-grpc");

/// Longest wait for a start's `listening on` line, or for an exit: far
/// beyond a healthy start, so a hang fails with the log instead of stalling.
pub const BOUND: Duration = Duration::from_secs(30);

/// Most stderr lines kept per process (the rest are counted, not kept), so
/// a long benchmark run cannot grow the log without limit.
const LOG_LINES: usize = 10_000;

/// Whether a variable of the environment that runs the suite could change
/// what the binary does: its own settings (`PICLUMEN_*`, `PORT`), logging
/// and tracing (`RUST_LOG*`, `OTEL_*`), its runtime's threads, and colour.
pub fn is_inherited_setting(name: &str) -> bool {
    name.starts_with("PICLUMEN_")
        || name.starts_with("OTEL_")
        || name.starts_with("RUST_LOG")
        || matches!(
            name,
            "PORT" | "TOKIO_WORKER_THREADS" | "NO_COLOR" | "CLICOLOR" | "CLICOLOR_FORCE"
        )
}

/// `program` with every inherited setting removed (see
/// [`is_inherited_setting`]) and stdin closed. Set the test's own
/// environment on it afterwards: `env_remove` would undo it.
pub fn program(program: impl AsRef<OsStr>) -> Command {
    let mut command = Command::new(program);
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(is_inherited_setting) {
            command.env_remove(&name);
        }
    }
    command.stdin(Stdio::null());
    command
}

/// The binary with `args` in a clean environment (see [`program`]); stdout
/// and stderr as the caller sets them, or captured by `output()`.
pub fn command(args: &[&str]) -> Command {
    let mut command = program(BIN);
    command.args(args);
    command
}

/// [`command`] run under the file-creation mask `umask` (octal, as the
/// shell's `umask` takes it), through `sh` so the test process's own mask
/// is never changed under its other threads.
pub fn command_with_umask(umask: &str, args: &[&str]) -> Command {
    let mut command = program("sh");
    command
        .args(["-c", "umask \"$0\" && exec \"$@\"", umask, BIN])
        .args(args);
    command
}

/// `serve --listen 127.0.0.1:0 --upstream-url UPSTREAM ARGS...`: a server
/// on a free loopback port in front of the Piclumen API (or a simulator)
/// at `upstream`.
pub fn serve_args<'a>(upstream: &'a str, args: &[&'a str]) -> Vec<&'a str> {
    [
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--upstream-url",
            upstream,
        ][..],
        args,
    ]
    .concat()
}

/// The address in a `listening on ADDR` log line, text or JSON. A JSON line
/// is decoded and its string fields searched, so the address comes out
/// without the quotes and escapes around it.
pub fn listening_addr(line: &str) -> Option<String> {
    match serde_json::from_str::<Value>(line) {
        Ok(value) => addr_in_json(&value),
        Err(_) => addr_in_text(line),
    }
}

fn addr_in_text(text: &str) -> Option<String> {
    let (_, rest) = text.split_once("listening on ")?;
    rest.split_whitespace().next().map(str::to_owned)
}

fn addr_in_json(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => addr_in_text(text),
        Value::Array(items) => items.iter().find_map(addr_in_json),
        // The message first: another field could quote such a line.
        Value::Object(fields) => fields
            .get("message")
            .and_then(addr_in_json)
            .or_else(|| fields.values().find_map(addr_in_json)),
        _ => None,
    }
}

/// Stderr lines as they arrive, shared with the thread that reads them.
#[derive(Default)]
struct Log {
    lines: Vec<String>,
    dropped: usize,
}

/// A running child that announced its address; killed and reaped when
/// dropped.
pub struct Process {
    child: Child,
    /// The address of its `listening on ADDR` line.
    pub addr: String,
    log: Arc<Mutex<Log>>,
    /// How many lines the log holds up to and including the listening
    /// line (more than it keeps if that line came past [`LOG_LINES`]).
    listening: usize,
    reader: Option<JoinHandle<()>>,
}

impl Process {
    /// Runs the binary with `args` in a clean environment plus `env`, and
    /// waits (at most [`BOUND`]) for its `listening on` line.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut command = command(args);
        command.envs(env.iter().copied());
        Self::spawn(command)
    }

    /// [`Process::start`] of `serve ARGS...`.
    pub fn serve(args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start(&[&["serve"], args].concat(), env)
    }

    /// `serve` on a free loopback port against `upstream`, then `args` (see
    /// [`serve_args`]).
    pub fn serve_against(upstream: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start(&serve_args(upstream, args), env)
    }

    /// [`Process::serve_against`] from async code (see
    /// [`Process::start_async`]).
    pub async fn serve_against_async(upstream: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_async(&serve_args(upstream, args), env).await
    }

    /// [`Process::start`] from async code: the wait for the listening line
    /// blocks, so it runs off the runtime's workers.
    pub async fn start_async(args: &[&str], env: &[(&str, &str)]) -> Self {
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let env: Vec<(&str, &str)> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            Self::start(&args, &env)
        })
        .await
        .expect("start task")
    }

    /// Spawns a prepared command (from [`command`] or [`program`], e.g.
    /// pinned to a core or wrapped in a profiler) with stdout discarded and
    /// stderr logged, and waits (at most [`BOUND`]) for its `listening on`
    /// line. Panics with the log if it exits or stays silent instead.
    pub fn spawn(mut command: Command) -> Self {
        command.stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {command:?}: {e}"));
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(Log::default()));
        let sink = Arc::clone(&log);
        let (found, listening) = mpsc::channel();
        // Reads to the end, so the child never blocks on a full pipe.
        let reader = std::thread::spawn(move || {
            let mut announced = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let addr = if announced {
                    None
                } else {
                    listening_addr(&line)
                };
                // Logged before it is announced, so whoever has the address
                // also finds the line in the log.
                let index = {
                    let mut log = sink.lock().expect("log lock");
                    if log.lines.len() < LOG_LINES {
                        log.lines.push(line);
                        log.lines.len()
                    } else {
                        log.dropped += 1;
                        log.lines.len() + log.dropped
                    }
                };
                if let Some(addr) = addr {
                    announced = true;
                    let _ = found.send((addr, index));
                }
            }
        });
        let mut process = Self {
            child,
            addr: String::new(),
            log,
            listening: 0,
            reader: Some(reader),
        };
        match listening.recv_timeout(BOUND) {
            Ok((addr, index)) => {
                process.addr = addr;
                process.listening = index;
                process
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                process.kill();
                panic!(
                    "no `listening on` line within {BOUND:?} from {command:?}:\n{}",
                    process.log_text()
                );
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = process.wait_exit(BOUND);
                panic!(
                    "{command:?} ended ({status}) without listening:\n{}",
                    process.log_text()
                );
            }
        }
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every stderr line so far.
    pub fn log(&self) -> Vec<String> {
        let log = self.log.lock().expect("log lock");
        let mut lines = log.lines.clone();
        if log.dropped > 0 {
            lines.push(format!("({} more lines not kept)", log.dropped));
        }
        lines
    }

    /// Every stderr line so far, joined by newlines.
    pub fn log_text(&self) -> String {
        self.log().join("\n")
    }

    /// The stderr lines up to and including the `listening on` line.
    pub fn startup_log(&self) -> Vec<String> {
        let log = self.log.lock().expect("log lock");
        log.lines[..self.listening.min(log.lines.len())].to_vec()
    }

    /// The `listening on` line itself.
    pub fn listening_line(&self) -> String {
        let log = self.log.lock().expect("log lock");
        let line = log.lines.get(self.listening - 1);
        line.cloned()
            .expect("the listening line is among the lines kept")
    }

    /// Sends signal `name` (`TERM`, `INT`, ...) with `kill -NAME PID`.
    pub fn signal(&self, name: &str) {
        let status = program("kill")
            .args([format!("-{name}"), self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {}: {status}", self.pid());
    }

    /// Sends SIGTERM, as an orchestrator stopping the process does.
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// The exit status if the process has exited, without waiting.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Waits at most `limit` for the child to exit, then for the rest of its
    /// stderr to reach the log; panics with the log past the limit.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let end = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() > end {
                panic!(
                    "pid {} did not exit within {limit:?}:\n{}",
                    self.pid(),
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // Its stderr closed with it (unless a child of its own still holds
        // it): the reader ends at once.
        let end = Instant::now() + Duration::from_secs(5);
        while self.reader.as_ref().is_some_and(|r| !r.is_finished()) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Some(reader) = self.reader.take_if(|r| r.is_finished()) {
            let _ = reader.join();
        }
        status
    }

    /// Kills the child (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs the binary with `args` in a clean environment plus `env`, expecting
/// it to stop by itself, unsuccessfully, without ever listening (within
/// [`BOUND`]); returns its stderr.
pub fn refused(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut child = command(args)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stderr = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let end = Instant::now() + BOUND;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("still running with {args:?} {env:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stderr = reader.join().expect("stderr reader");
    assert!(!status.success(), "{args:?} {env:?} exited 0: {stderr}");
    assert!(
        !stderr.contains("listening on"),
        "{args:?} {env:?} listened: {stderr}"
    );
    stderr
}
