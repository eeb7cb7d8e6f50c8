//! The binary as a server: `serve --simulate` answering `generate --wait`,
//! the standalone `sim` with its tokens and stats, the startup line and its
//! redaction, the log filter and JSON logs, `PORT` and the metrics
//! endpoint, refusing an exposed default token, and a SIGTERM drain.

mod common;

use std::time::Duration;

use common::{
    Process, SIMULATE_FAST, Sim, args::secs, authed, eventually, generate, long_jobs, process,
};

const TOKEN: &str = "config-token";

#[test]
fn generate_wait_against_serve_simulate() {
    let server = Process::serve(SIMULATE_FAST, &[]);
    let url = format!("http://{}", server.addr);
    let output = process::command(&[
        "generate",
        "--server",
        &url,
        "a magical landscape",
        "--wait",
        "--batch-size",
        "2",
    ])
    .output()
    .expect("run generate");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "generate failed: {stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "mark id then two URLs: {stdout}");
    let mark_id = lines[0];
    assert_eq!(mark_id.len(), 32);
    assert!(
        lines[1..]
            .iter()
            .all(|l| l.starts_with("http://127.0.0.1:") && l.contains(mark_id)),
        "{stdout}"
    );
    // Progress went to stderr: the queue position and the states.
    assert!(stderr.contains("queue position"), "{stderr}");
    assert!(stderr.contains("succeeded, 2 image(s)"), "{stderr}");

    let check = process::command(&["check", "--server", &url, mark_id])
        .output()
        .expect("run check");
    assert!(check.status.success());
    assert!(String::from_utf8_lossy(&check.stdout).contains("succeeded"));
}

#[test]
fn client_reports_server_errors_with_their_code() {
    let server = Process::start(&["serve", "--simulate", "--listen", "127.0.0.1:0"], &[]);
    let url = format!("http://{}", server.addr);
    let output = process::command(&["generate", "--server", &url, "p", "--batch-size", "9"])
        .output()
        .expect("run generate");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(3),
        "a refused call exits 3: {stderr}"
    );
    assert!(stderr.contains("resolution.batch_size"), "{stderr}");
}

#[test]
fn standalone_sim_checks_tokens_and_counts_requests() {
    let sim = Process::start(
        &[
            "sim",
            "--listen",
            "127.0.0.1:0",
            "--tokens",
            "a,b",
            "--job-duration",
            "1s",
        ],
        &[],
    );
    let base = format!("http://{}", sim.addr);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let http = reqwest::Client::new();
        let post = |path: &str, token: &str, body: &str| {
            http.post(format!("{base}{path}"))
                .header("authorization", token)
                .header("content-type", "application/json;charset=UTF-8")
                .body(body.to_owned())
                .send()
        };
        let denied = post("/api/gen/create", "z", r#"{"prompt":"p"}"#)
            .await
            .expect("post");
        assert_eq!(denied.status().as_u16(), 401);
        let created = post(
            "/api/gen/create",
            "a",
            r#"{"prompt":"p","resolution":{"width":64,"height":64,"batch_size":2}}"#,
        )
        .await
        .expect("post")
        .text()
        .await
        .expect("text");
        let created: serde_json::Value = serde_json::from_str(&created).expect("json");
        assert_eq!(created["status"], 0);
        let mark_id = created["data"]["markId"]
            .as_str()
            .expect("markId")
            .to_owned();
        let body = format!(r#"["{mark_id}","unknown"]"#);
        let seen_by_b = post("/api/task/batch-process-task", "b", &body)
            .await
            .expect("post")
            .text()
            .await
            .expect("text");
        let seen_by_b: serde_json::Value = serde_json::from_str(&seen_by_b).expect("json");
        assert_eq!(
            seen_by_b["data"],
            serde_json::json!([]),
            "b does not see a's job"
        );
        let seen_by_a = post("/api/task/batch-process-task", "a", &body)
            .await
            .expect("post")
            .text()
            .await
            .expect("text");
        let seen_by_a: serde_json::Value = serde_json::from_str(&seen_by_a).expect("json");
        assert_eq!(seen_by_a["data"][0]["markId"], mark_id.as_str());
        assert_eq!(seen_by_a["data"][0]["status"], "pending");
        let stats: serde_json::Value = http
            .get(format!("{base}/_sim/stats"))
            .send()
            .await
            .expect("stats")
            .json_value()
            .await;
        assert_eq!(stats["create_calls"], 2);
        assert_eq!(stats["status_calls"], 2);
        assert_eq!(stats["status_ids"], 4);
        assert_eq!(stats["unauthorized"], 1);
    });
}

trait JsonValue {
    async fn json_value(self) -> serde_json::Value;
}

impl JsonValue for reqwest::Response {
    async fn json_value(self) -> serde_json::Value {
        serde_json::from_str(&self.text().await.expect("text")).expect("json")
    }
}

#[test]
fn sigterm_drains_and_exits_zero() {
    let mut server = Process::start(
        &[
            "serve",
            "--simulate",
            "--listen",
            "127.0.0.1:0",
            "--drain-timeout",
            "3s",
        ],
        &[],
    );
    // `kill -TERM PID`, asserted to succeed.
    server.terminate();
    // Panics past 10 s ("no exit after SIGTERM"); returns once the log has
    // all the child wrote.
    let exit = server.wait_exit(Duration::from_secs(10));
    assert!(exit.success(), "exit status {exit:?}");
    let log = server.log_text();
    assert!(
        log.contains("SIGTERM received") && log.contains("drained"),
        "{log}"
    );
}

#[test]
fn simulate_mode_says_so_and_logs_json_on_request() {
    let server = Process::start(
        &[
            "--log-format",
            "json",
            "serve",
            "--simulate",
            "--listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    let log = server.log();
    let lines: Vec<serde_json::Value> = log
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines.iter().any(|l| l["message"]
            .as_str()
            .is_some_and(|m| m.contains("SIMULATION MODE"))),
        "{log:?}"
    );
}

#[test]
fn port_env_sets_the_listen_address_and_metrics_are_served() {
    let free = || {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr")
    };
    let port = free().port();
    let metrics = free();
    let port_text = port.to_string();
    let metrics_text = metrics.to_string();
    let server = Process::start(
        &[
            "serve",
            "--simulate",
            "--poll-interval",
            "250ms",
            "--sim-job-duration",
            "500ms",
            "--metrics-listen",
            &metrics_text,
        ],
        &[("PORT", &port_text)],
    );
    assert_eq!(
        server.addr,
        format!("0.0.0.0:{port}"),
        "PORT is honoured when --listen is absent"
    );
    let url = format!("http://127.0.0.1:{port}");
    let output = process::command(&["generate", "--server", &url, "p", "--wait"])
        .output()
        .expect("generate");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let text = runtime.block_on(async {
        reqwest::get(format!("http://{metrics}/metrics"))
            .await
            .expect("scrape")
            .text()
            .await
            .expect("body")
    });
    for name in [
        "piclumen_upstream_calls_total",
        "piclumen_hub_ids_per_call",
        "piclumen_hub_jobs",
        "piclumen_hub_watchers",
    ] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
}

#[test]
fn refuses_an_exposed_default_token_without_caller_auth() {
    let output = process::command(&["serve", "--listen", "0.0.0.0:0", "--token", "real-credits"])
        .output()
        .expect("run serve");
    assert!(
        !output.status.success(),
        "serve started with an exposed default token"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("refusing to start") && stderr.contains("--api-keys-file"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("real-credits"),
        "the token leaked into the error"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_line_redacts_the_upstream_credentials() {
    let server = Process::serve_against_async("http://op:hunter2@127.0.0.1:9", &[], &[]).await;
    let log = server.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("listening on"))
        .expect("listening line");
    assert!(line.contains("upstream=http://***@127.0.0.1:9"), "{line}");
    assert!(!log.contains("hunter2") && !log.contains("//op"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_filter_applies() {
    let sim = Sim::start(long_jobs()).await;
    let upstream = sim.url();
    let debug = Process::serve_against_async(
        &upstream,
        &[],
        &[("PICLUMEN_LOG", "warn,piclumen_grpc=debug")],
    )
    .await;
    let info = Process::serve_against_async(&upstream, &[], &[]).await;
    for server in [&debug, &info] {
        let mut client = server.client().await;
        client
            .generate_image(authed(TOKEN, generate("p")))
            .await
            .expect("generate");
    }
    let answered = |s: &Process| s.log_text().contains("call answered");
    assert!(
        eventually(secs(10), || async { answered(&debug) }).await,
        "debug line missing: {}",
        debug.log_text()
    );
    assert!(!answered(&info), "debug line at info: {}", info.log_text());
}
