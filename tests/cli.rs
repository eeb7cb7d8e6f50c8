//! The binary as people use it: `serve --simulate` with `generate --wait`,
//! and the standalone `sim` with its knobs and stats.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

const BIN: &str = env!("CARGO_BIN_EXE_piclumen-grpc");

/// A child process killed (by its own handle) when dropped.
struct Running {
    child: Child,
    addr: String,
    /// Every stderr line seen so far.
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the binary and waits for its `listening on ADDR` log line.
fn start(args: &[&str]) -> Running {
    start_with_env(args, &[])
}

fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Running {
    let mut child = Command::new(BIN)
        .args(args)
        .env_remove("PICLUMEN_TOKEN")
        .env_remove("PORT")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("listening on ").nth(1) {
                let addr = rest
                    .split(|c: char| c.is_whitespace() || c == '"')
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                let _ = tx.send(addr);
            }
            sink.lock().expect("log lock").push(line);
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("listening line");
    Running { child, addr, log }
}

impl Running {
    fn log(&self) -> Vec<String> {
        self.log.lock().expect("log lock").clone()
    }
}

#[test]
fn generate_wait_against_serve_simulate() {
    let server = start(&[
        "serve",
        "--simulate",
        "--listen",
        "127.0.0.1:0",
        "--sim-job-duration",
        "1s",
        "--poll-interval",
        "250ms",
    ]);
    let url = format!("http://{}", server.addr);
    let output = Command::new(BIN)
        .args([
            "generate",
            "--server",
            &url,
            "a magical landscape",
            "--wait",
            "--batch-size",
            "2",
        ])
        .env_remove("PICLUMEN_TOKEN")
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

    let check = Command::new(BIN)
        .args(["check", "--server", &url, mark_id])
        .output()
        .expect("run check");
    assert!(check.status.success());
    assert!(String::from_utf8_lossy(&check.stdout).contains("succeeded"));
}

#[test]
fn client_reports_server_errors_with_their_code() {
    let server = start(&["serve", "--simulate", "--listen", "127.0.0.1:0"]);
    let url = format!("http://{}", server.addr);
    let output = Command::new(BIN)
        .args(["generate", "--server", &url, "p", "--batch-size", "9"])
        .output()
        .expect("run generate");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("resolution.batch_size"), "{stderr}");
}

#[test]
fn standalone_sim_checks_tokens_and_counts_requests() {
    let sim = start(&[
        "sim",
        "--listen",
        "127.0.0.1:0",
        "--tokens",
        "a,b",
        "--job-duration",
        "1s",
    ]);
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
    let mut server = start(&[
        "serve",
        "--simulate",
        "--listen",
        "127.0.0.1:0",
        "--drain-timeout",
        "3s",
    ]);
    let status = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let started = std::time::Instant::now();
    let exit = loop {
        if let Some(exit) = server.child.try_wait().expect("wait") {
            break exit;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "exit status {exit:?}");
    std::thread::sleep(Duration::from_millis(100));
    let log = server.log().join("\n");
    assert!(
        log.contains("SIGTERM received") && log.contains("drained"),
        "{log}"
    );
}

#[test]
fn simulate_mode_says_so_and_logs_json_on_request() {
    let server = start(&[
        "--log-format",
        "json",
        "serve",
        "--simulate",
        "--listen",
        "127.0.0.1:0",
    ]);
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
    let server = start_with_env(
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
    let output = Command::new(BIN)
        .args(["generate", "--server", &url, "p", "--wait"])
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
    let output = Command::new(BIN)
        .args(["serve", "--listen", "0.0.0.0:0", "--token", "real-credits"])
        .env_remove("PORT")
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
