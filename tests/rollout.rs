//! A fleet across a deploy: real `serve` replicas sharing a real
//! `redis-server` (`support/redis_server.rs`) in front of one simulator.
//! A replica drained with a create in flight finishes it and records its
//! outcome; a replica killed (SIGKILL) while holding a request_id claim
//! frees the key if it had not sent the create yet, and leaves "outcome
//! unknown" if it had: never a second create.

mod common;
#[path = "support/redis_server.rs"]
mod redis_server;
#[path = "support/tcp.rs"]
mod tcp;

use std::{
    process::{Command, ExitStatus},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use common::*;
use piclumen_grpc::pb;
use redis_server::Redis;
use serde_json::json;
use tcp::{Gate, Relay};
use tonic::{Code, Request};

fn call(id: &str, timeout: Duration) -> Request<pb::GenerateImageRequest> {
    let mut request = authed(
        TOKEN,
        pb::GenerateImageRequest {
            request_id: id.into(),
            ..generate("a lighthouse")
        },
    );
    request.set_timeout(timeout);
    request
}

/// A replica sharing the store at `store` (a `redis://` URL).
fn replica(upstream: &str, store: &str) -> Process {
    Process::serve_against(upstream, &[], &[("PICLUMEN_IDEMPOTENCY_STORE", store)])
}

/// Replicas A and B sharing a new Redis in front of one simulator whose
/// next create takes 3 s, long enough to act while it is in flight.
async fn two_replicas_with_a_slow_create() -> (Redis, Sim, Process, Process) {
    let redis = Redis::start();
    let sim = Sim::start(sim_config()).await;
    let (upstream, store) = (sim.url(), redis.url());
    let a = replica(&upstream, &store);
    let b = replica(&upstream, &store);
    sim.script(json!([{"endpoint": "create", "delay_ms": 3000}]))
        .await;
    (redis, sim, a, b)
}

/// Sends SIGTERM, as every rollout does.
fn sigterm(served: &Process) {
    served.terminate();
}

/// Kills the replica outright (SIGKILL), as an OOM kill or a crash would.
fn sigkill(served: &mut Process) {
    served.kill();
}

/// Waits (at most [`STALL_BOUND`]) for the replica to exit.
async fn exit_status(served: &mut Process) -> ExitStatus {
    bounded("the replica exiting", async {
        loop {
            if let Some(status) = served.try_exit() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

#[tokio::test]
async fn a_rollout_with_a_create_in_flight_creates_once() {
    let (_redis, sim, mut a, b) = two_replicas_with_a_slow_create().await;

    // The caller gives up after 1 s; the create goes on in A.
    let status = bounded(
        "GenerateImage on A",
        a.client()
            .await
            .generate_image(call("R", Duration::from_secs(1))),
    )
    .await
    .expect_err("the create takes 3 s");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");

    // The rollout stops A; the caller retries on B at once.
    sigterm(&a);
    let mut b_client = b.client().await;
    let first = bounded(
        "retry on B during A's drain",
        b_client.generate_image(call("R", Duration::from_secs(10))),
    )
    .await
    .expect("B returns A's create")
    .into_inner();
    let exit = exit_status(&mut a).await;
    assert!(exit.success(), "A drained and exited cleanly: {exit:?}");

    // A recorded the outcome before it exited: a retry now reads it.
    let second = bounded(
        "retry on B after A exited",
        b_client.generate_image(call("R", Duration::from_secs(5))),
    )
    .await
    .expect("the recorded outcome")
    .into_inner();
    assert_eq!(second, first, "both retries get A's mark id and seed");
    assert_eq!(sim.stat("create_calls").await, 1, "one create for R");
}

#[tokio::test]
async fn a_holder_killed_after_sending_leaves_the_outcome_unknown() {
    let (_redis, sim, mut a, b) = two_replicas_with_a_slow_create().await;
    let mut a_client = a.client().await;
    let caller = tokio::spawn(async move {
        a_client
            .generate_image(call("S", Duration::from_secs(10)))
            .await
    });
    assert!(
        eventually(Duration::from_secs(10), || async {
            sim.stat("create_calls").await == 1
        })
        .await,
        "A sent its create"
    );

    // While A lives, a retry elsewhere waits for A's create and says so.
    let mut b_client = b.client().await;
    let status = bounded(
        "retry on B while A runs the create",
        b_client.generate_image(call("S", Duration::from_secs(1))),
    )
    .await
    .expect_err("A's create takes 3 s");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("another replica"),
        "the message says who runs the create: {status:?}"
    );

    // A dies after sending: the job may exist, so no retry creates again.
    sigkill(&mut a);
    let _ = caller.await;
    for attempt in ["once A's lease lapsed", "again, later"] {
        let status = bounded(
            "retry on B after A died",
            b_client.generate_image(call("S", Duration::from_secs(15))),
        )
        .await
        .expect_err(attempt);
        assert_status(&status, Code::Aborted, "CREATE_OUTCOME_UNKNOWN");
        // Long enough for the simulator's delayed create to have ended.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    assert_eq!(sim.stat("create_calls").await, 1, "never a second create");
}

#[tokio::test]
async fn a_holder_killed_before_sending_frees_the_key() {
    let redis = Redis::start();
    let sim = Sim::start(sim_config()).await;
    let upstream = sim.url();
    // A reaches Redis through a proxy that lets A look the key up and claim
    // it, then holds A's next command (the one recording "sent" before the
    // create goes out): A is killed between its claim and its create.
    let gate = Gate::start(redis.port, 3).await;
    let mut a = replica(&upstream, &format!("redis://{}", gate.addr));
    let b = replica(&upstream, &redis.url());
    let mut a_client = a.client().await;
    let caller = tokio::spawn(async move {
        a_client
            .generate_image(call("T", Duration::from_secs(10)))
            .await
    });
    assert!(
        eventually(Duration::from_secs(10), || async {
            gate.holding.load(Ordering::SeqCst)
        })
        .await,
        "A claimed the key and is about to record its create as sent"
    );
    sigkill(&mut a);
    let _ = caller.await;
    assert_eq!(sim.stat("create_calls").await, 0, "A sent nothing");

    // Within a few seconds the claim's lease lapses and B creates.
    let started = tokio::time::Instant::now();
    let created = bounded(
        "retry on B after A died",
        b.client()
            .await
            .generate_image(call("T", Duration::from_secs(10))),
    )
    .await
    .expect("the key is free again")
    .into_inner();
    eprintln!("key free again after {:?}", started.elapsed());
    assert!(!created.mark_id.is_empty());
    assert_eq!(sim.stat("create_calls").await, 1);
}

/// Runs `scripts/deploy-check.sh --rules-only` on a copy of the deploy
/// files with `from` replaced by `to` in `file`; its exit status and
/// output.
fn deploy_rules(file: &str, from: &str, to: &str) -> (bool, String) {
    let root = env!("CARGO_MANIFEST_DIR");
    let dir = redis_server::TempDir::new("deploy-rules");
    let k8s = dir.0.join("deploy/k8s");
    std::fs::create_dir_all(&k8s).expect("mkdir");
    let source = std::path::Path::new(root);
    for entry in std::fs::read_dir(source.join("deploy/k8s")).expect("deploy/k8s") {
        let path = entry.expect("entry").path();
        std::fs::copy(&path, k8s.join(path.file_name().expect("name"))).expect("copy");
    }
    std::fs::copy(source.join("render.yaml"), dir.0.join("render.yaml")).expect("copy");
    let target = dir.0.join(file);
    let text = std::fs::read_to_string(&target).expect("read");
    assert!(text.contains(from), "{file} holds {from:?}");
    std::fs::write(&target, text.replace(from, to)).expect("write");
    let output = Command::new("bash")
        .arg(source.join("scripts/deploy-check.sh"))
        .arg("--rules-only")
        .arg(&dir.0)
        .output()
        .expect("run deploy-check");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    (output.status.success(), text)
}

#[test]
fn deploy_files_leave_the_drain_its_time() {
    let (ok, out) = deploy_rules("render.yaml", "", "");
    assert!(ok, "the deploy files as committed pass: {out}");
    assert!(
        out.contains("maxShutdownDelaySeconds 30 > drain 10 s"),
        "{out}"
    );

    let (ok, out) = deploy_rules(
        "render.yaml",
        "maxShutdownDelaySeconds: 30",
        "maxShutdownDelaySeconds: 8",
    );
    assert!(!ok, "Render stopping before the drain ends: {out}");
    assert!(
        out.contains("maxShutdownDelaySeconds 8 is not above drain 10 s"),
        "{out}"
    );

    let (ok, out) = deploy_rules("render.yaml", "value: 10s", "value: 45s");
    assert!(!ok, "a drain longer than Render waits: {out}");

    let (ok, out) = deploy_rules(
        "deploy/k8s/deployment.yaml",
        "terminationGracePeriodSeconds: 30",
        "terminationGracePeriodSeconds: 12",
    );
    assert!(!ok, "the kubelet killing the pod mid-drain: {out}");
    assert!(
        out.contains("terminationGracePeriodSeconds 12 is not above preStop 5 s + drain 10 s"),
        "{out}"
    );
}

#[tokio::test]
async fn connections_age_out_and_clients_reconnect_by_themselves() {
    let mut config = server_config();
    config.max_connection_age = Duration::from_secs(1);
    config.max_connection_age_grace = Duration::from_secs(2);
    let h = Harness::with(long_jobs(), config).await;
    let relay = Relay::start(h.server.addr).await;
    let mut client =
        pb::image_service_client::ImageServiceClient::new(channel_to(relay.addr).await);

    // A call in flight when the connection reaches its age (about 1 s)
    // finishes: the GOAWAY lets open calls end.
    h.sim
        .script(json!([{"endpoint": "create", "delay_ms": 1500}]))
        .await;
    let job = bounded(
        "a call spanning the connection's age",
        client.generate_image(authed(TOKEN, generate("across the age"))),
    )
    .await
    .expect("a call open at the GOAWAY ends normally")
    .into_inner();
    assert_eq!(relay.accepted(), 1);

    // A watch still open at age + grace is cut: the connection is closed.
    let mut watcher = client.clone();
    let started = tokio::time::Instant::now();
    let (_, end) = collect_watch(&mut watcher, TOKEN, &job.mark_id).await;
    let status = end.expect_err("the job runs for 30 s; the connection ends first");
    eprintln!("watch cut after {:?}: {status:?}", started.elapsed());

    // The client reconnects by itself: every call succeeds, over a new
    // connection.
    for n in 0..5 {
        let check = check_request(job.mark_id.clone());
        bounded("CheckImage", client.check_image(authed(TOKEN, check)))
            .await
            .unwrap_or_else(|e| panic!("call {n} after the connection aged out: {e:?}"));
    }
    assert!(relay.accepted() >= 2, "the client opened a new connection");
}

/// The CLI (`piclumen-grpc ARGS...`) as a child process, its stderr lines
/// collected as they come.
struct CliRun {
    child: std::process::Child,
    stderr: Arc<std::sync::Mutex<Vec<String>>>,
}

impl CliRun {
    fn start(args: &[&str]) -> Self {
        use std::io::{BufRead, BufReader};
        let mut child = process::command(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn the CLI");
        let stderr = Arc::new(std::sync::Mutex::new(Vec::new()));
        let lines = Arc::clone(&stderr);
        let pipe = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                lines.lock().expect("lines").push(line);
            }
        });
        Self { child, stderr }
    }

    fn stderr_lines(&self, containing: &str) -> usize {
        let lines = self.stderr.lock().expect("lines");
        lines.iter().filter(|l| l.contains(containing)).count()
    }

    /// Waits for the CLI to exit; its status and stdout.
    async fn finish(mut self) -> (ExitStatus, String, Vec<String>) {
        use std::io::Read;
        let status = bounded("the CLI exiting", async {
            loop {
                if let Some(status) = self.child.try_wait().expect("try_wait") {
                    return status;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        let mut stdout = String::new();
        let mut pipe = self.child.stdout.take().expect("stdout");
        pipe.read_to_string(&mut stdout).expect("read stdout");
        // Let the reader thread take the last lines.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let stderr = self.stderr.lock().expect("lines").clone();
        (status, stdout, stderr)
    }
}

/// The CLI follows a job on replica A, A goes away (drained, or killed),
/// and replica B takes over A's address, as a rollout behind one address
/// does: the CLI re-issues the watch and ends with the job, one line on
/// stderr saying so, and stdout holding one JSON object.
async fn cli_rides_through(command: &[&str], kill: bool) -> serde_json::Value {
    let sim = Sim::start(piclumen_grpc::sim::SimConfig {
        job_duration: Duration::from_secs(6),
        ..sim_config()
    })
    .await;
    let upstream = sim.url();
    let mut a = Process::serve_against(&upstream, &[], &[]);
    let server = format!("http://{}", a.addr);
    let mut args = command.to_vec();
    let mark_id;
    if command[0] == "watch" {
        mark_id = start_job(&mut a.client().await, TOKEN, "a lighthouse").await;
        args.push(&mark_id);
    }
    args.extend(["--server", &server, "--token", TOKEN, "--json"]);
    let cli = CliRun::start(&args);
    assert!(
        eventually(Duration::from_secs(10), || async {
            cli.stderr_lines("pending") + cli.stderr_lines("running") > 0
        })
        .await,
        "the CLI follows the job on A"
    );
    if kill {
        sigkill(&mut a);
    } else {
        sigterm(&a);
        let exit = exit_status(&mut a).await;
        assert!(exit.success(), "A drained: {exit:?}");
    }
    let _b = Process::serve(&["--listen", &a.addr, "--upstream-url", &upstream], &[]);

    let (status, stdout, stderr) = cli.finish().await;
    assert!(
        status.success(),
        "the CLI ended with the job: {status:?} {stderr:?}"
    );
    let reconnects: Vec<_> = stderr
        .iter()
        .filter(|l| l.contains("reconnecting"))
        .collect();
    assert_eq!(
        reconnects.len(),
        1,
        "one line per re-issued watch: {stderr:?}"
    );
    eprintln!("{}", reconnects[0]);
    let job: serde_json::Value =
        serde_json::from_str(stdout.trim()).expect("stdout is one JSON object");
    assert_eq!(job["state"], "SUCCEEDED", "{job}");
    job
}

#[tokio::test]
async fn watch_rides_through_a_drain() {
    cli_rides_through(&["watch"], false).await;
}

#[tokio::test]
async fn generate_wait_rides_through_a_lost_connection() {
    let job = cli_rides_through(&["generate", "a lighthouse", "--wait"], true).await;
    assert!(job["seed"].is_i64(), "{job}");
}

/// `check --wait` on replica A, A drains (answering the wait at once, then
/// refusing calls) and B takes over A's address: the CLI asks again on a
/// new connection and ends with the job's next change, exit 0.
#[tokio::test]
async fn check_wait_rides_through_a_drain() {
    let sim = Sim::start(piclumen_grpc::sim::SimConfig {
        job_duration: Duration::from_secs(6),
        ..sim_config()
    })
    .await;
    let upstream = sim.url();
    let a = Process::serve_against(&upstream, &[], &[]);
    let mut client = a.client().await;
    let mark_id = start_job(&mut client, TOKEN, "a lighthouse").await;
    let plain = check_request(mark_id.clone());
    let first = bounded("CheckImage", client.check_image(authed(TOKEN, plain)))
        .await
        .expect("check")
        .into_inner()
        .job
        .expect("job");
    let server = format!("http://{}", a.addr);
    let cli = CliRun::start(&[
        "check",
        &mark_id,
        "--wait",
        "60s",
        "--etag",
        &first.etag,
        "--server",
        &server,
        "--token",
        TOKEN,
        "--json",
    ]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut a = a;
    sigterm(&a);
    assert!(exit_status(&mut a).await.success(), "A drained");
    let _b = Process::serve(&["--listen", &a.addr, "--upstream-url", &upstream], &[]);
    let (status, stdout, stderr) = cli.finish().await;
    assert!(status.success(), "{status:?} {stderr:?}");
    let job: serde_json::Value =
        serde_json::from_str(stdout.trim()).expect("stdout is one JSON object");
    assert_ne!(job["etag"], first.etag.as_str(), "the next change: {job}");
    let reconnects = stderr.iter().filter(|l| l.contains("reconnecting")).count();
    assert_eq!(reconnects, 1, "one line for the new connection: {stderr:?}");
}
