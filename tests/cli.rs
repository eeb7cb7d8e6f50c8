//! The binary as people use it: `serve --simulate` with `generate --wait`,
//! the standalone `sim` with its knobs and stats, and the client for
//! scripts and terminals: `--json`, `--out`, exit codes, and the progress
//! display seen through a pseudo-terminal.

mod common;

use std::{
    io::{BufRead, BufReader, Read},
    path::Path,
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use common::{Harness, TOKEN, unused_addr};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
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

// === The client for scripts: --json, --out, exit codes ===

/// A client command with no token or server inherited from the environment.
fn client(args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .env_remove("PICLUMEN_TOKEN")
        .env_remove("PICLUMEN_SERVER");
    command
}

/// Runs a client command to its end off the runtime, which keeps serving
/// the in-process server and simulator meanwhile.
async fn run_client(args: &[&str]) -> Output {
    let mut command = client(args);
    command.stdin(Stdio::null());
    tokio::task::spawn_blocking(move || command.output().expect("run client"))
        .await
        .expect("join")
}

fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The whole of stdout as exactly one JSON object on one line.
fn one_json_object(stdout: &[u8]) -> Value {
    let text = std::str::from_utf8(stdout).expect("stdout is UTF-8");
    let values = serde_json::Deserializer::from_str(text)
        .into_iter::<Value>()
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {text:?}"));
    assert_eq!(values.len(), 1, "one JSON value on stdout: {text:?}");
    assert_eq!(text.lines().count(), 1, "on one line: {text:?}");
    let value = values.into_iter().next().expect("one value");
    assert!(value.is_object(), "{value}");
    value
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_wait_json_prints_the_final_job_and_nothing_else() {
    let h = Harness::start().await;
    let server = format!("http://{}", h.server.addr);
    let output = run_client(&[
        "generate",
        "--server",
        &server,
        "--token",
        TOKEN,
        "a magical landscape",
        "--wait",
        "--json",
        "--batch-size",
        "2",
        "--width",
        "128",
        "--height",
        "96",
        "--seed",
        "9896923949",
    ])
    .await;
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    let job = one_json_object(&output.stdout);
    let mark_id = job["mark_id"].as_str().expect("mark_id").to_owned();
    assert_eq!(mark_id.len(), 32, "{job}");
    assert_eq!(job["state"], "SUCCEEDED");
    assert_eq!(job["upstream_status"], "success");
    assert_eq!(job["queue_position"], 0);
    assert_eq!(job["seed"], 9896923949_i64);
    assert!(
        job["prompt_id"].as_str().is_some_and(|p| !p.is_empty()),
        "{job}"
    );
    let images = job["images"].as_array().expect("images");
    assert_eq!(images.len(), 2, "{job}");
    for image in images {
        assert!(image["url"].as_str().is_some_and(|u| !u.is_empty()));
        assert!(image["name"].as_str().is_some_and(|n| !n.is_empty()));
        assert_eq!(
            (image["width"].clone(), image["height"].clone()),
            (json!(128), json!(96))
        );
        assert_eq!(image["nsfw"], false);
        assert!(image.get("path").is_none(), "no path without --out");
    }
    // The mark id and the progress went to stderr.
    assert!(stderr.contains(&format!("mark id: {mark_id}")), "{stderr}");
    assert!(stderr.contains("queue position"), "{stderr}");

    // `watch --json` of the finished job prints the same job, without seed.
    let watched = run_client(&[
        "watch", "--server", &server, "--token", TOKEN, &mark_id, "--json",
    ])
    .await;
    assert_eq!(watched.status.code(), Some(0), "{}", stderr_of(&watched));
    let mut expected = job.clone();
    expected.as_object_mut().expect("object").remove("seed");
    assert_eq!(one_json_object(&watched.stdout), expected);

    let checked = run_client(&[
        "check", "--server", &server, "--token", TOKEN, &mark_id, "--json",
    ])
    .await;
    assert_eq!(checked.status.code(), Some(0), "{}", stderr_of(&checked));
    assert_eq!(one_json_object(&checked.stdout), expected);

    // Without --wait, --json gives the mark id and seed at once.
    let started = run_client(&[
        "generate", "--server", &server, "--token", TOKEN, "p", "--json", "--seed", "5",
    ])
    .await;
    assert_eq!(started.status.code(), Some(0), "{}", stderr_of(&started));
    let started = one_json_object(&started.stdout);
    assert_eq!(started["seed"], 5);
    assert_eq!(started["mark_id"].as_str().map(str::len), Some(32));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_job_exits_1_and_still_prints_its_json() {
    let h = Harness::start().await;
    let server = format!("http://{}", h.server.addr);
    let output = run_client(&[
        "generate",
        "--server",
        &server,
        "--token",
        TOKEN,
        "a castle [sim:fail]",
        "--wait",
        "--json",
    ])
    .await;
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let job = one_json_object(&output.stdout);
    assert_eq!(job["state"], "FAILED");
    assert_eq!(job["upstream_status"], "failed");
    assert_eq!(job["images"], json!([]));
    assert!(stderr.contains("ended failed"), "{stderr}");
    let mark_id = job["mark_id"].as_str().expect("mark_id");

    // Plain `watch` and `check` of the failed job exit 1 too.
    for command in ["watch", "check"] {
        let output = run_client(&[command, "--server", &server, "--token", TOKEN, mark_id]).await;
        assert_eq!(
            output.status.code(),
            Some(1),
            "{command}: {}",
            stderr_of(&output)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_exits_3_with_nothing_on_stdout() {
    let server = format!("http://{}", unused_addr());
    for args in [
        vec!["generate", "--server", &server, "p", "--wait", "--json"],
        vec!["watch", "--server", &server, "m", "--json"],
        vec!["check", "--server", &server, "m"],
    ] {
        let output = run_client(&args).await;
        let stderr = stderr_of(&output);
        assert_eq!(output.status.code(), Some(3), "{args:?}: {stderr}");
        assert!(output.stdout.is_empty(), "{args:?}");
        assert!(stderr.contains("cannot connect to"), "{stderr}");
        assert!(stderr.contains("refused"), "the cause is shown: {stderr}");
    }
}

#[test]
fn usage_errors_exit_2_and_help_lists_the_exit_codes() {
    for args in [
        &["generate", "--bogus", "p"][..],
        &["generate", "p", "--out", "dir"],
        &["generate", "--server", "not a url", "p"],
        &["watch"],
        &["check", "--json"],
    ] {
        let output = client(args).output().expect("run");
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr_of(&output)
        );
        assert!(output.stdout.is_empty(), "{args:?}");
    }
    for args in [
        &["--help"][..],
        &["generate", "--help"],
        &["watch", "--help"],
        &["check", "--help"],
    ] {
        let output = client(args).output().expect("run");
        assert_eq!(output.status.code(), Some(0), "{args:?}");
        let help = String::from_utf8_lossy(&output.stdout);
        for line in [
            "0  the job succeeded",
            "1  the job failed",
            "2  usage",
            "3  a call to the server, or an image download, failed",
        ] {
            assert!(help.contains(line), "{args:?} help lacks {line:?}:\n{help}");
        }
    }
    let help = client(&["watch", "--help"]).output().expect("run").stdout;
    let help = String::from_utf8_lossy(&help);
    assert!(
        help.contains("--json") && help.contains("--out <DIR>"),
        "{help}"
    );
}

/// Decodes a PNG file whole and returns its width and height.
fn png_size(path: &Path) -> (u32, u32) {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .unwrap_or_else(|e| panic!("{} is not a PNG: {e}", path.display()));
    let mut pixels = vec![0; reader.output_buffer_size().expect("buffer size")];
    let frame = reader
        .next_frame(&mut pixels)
        .unwrap_or_else(|e| panic!("{} does not decode: {e}", path.display()));
    (frame.width, frame.height)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_saves_the_simulators_images_decodable_at_the_jobs_size() {
    let h = Harness::start().await;
    let server = format!("http://{}", h.server.addr);
    let scratch = tempfile::tempdir().expect("tempdir");
    // A directory that does not exist yet, two levels deep.
    let dir = scratch.path().join("new").join("images");
    let dir_text = dir.to_string_lossy().into_owned();
    let output = run_client(&[
        "generate",
        "--server",
        &server,
        "--token",
        TOKEN,
        "a magical landscape",
        "--wait",
        "--json",
        "--batch-size",
        "2",
        "--width",
        "200",
        "--height",
        "120",
        "--out",
        &dir_text,
    ])
    .await;
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    let job = one_json_object(&output.stdout);
    let images = job["images"].as_array().expect("images");
    assert_eq!(images.len(), 2, "{job}");
    let mut expected_files = Vec::new();
    for image in images {
        let name = image["name"].as_str().expect("name");
        let path = dir.join(name);
        assert_eq!(image["path"], path.to_string_lossy().as_ref(), "{job}");
        assert_eq!(png_size(&path), (200, 120), "{name}");
        assert!(
            stderr.contains(&format!("saved {}", path.display())),
            "{stderr}"
        );
        expected_files.push(name.to_owned());
    }
    expected_files.sort();
    assert_eq!(
        files_in(&dir),
        expected_files,
        "only the images, no temp file"
    );

    // Plain output with --out lists the saved files; `watch` saves the same.
    let mark_id = job["mark_id"].as_str().expect("mark_id");
    let again = scratch.path().join("again");
    let output = run_client(&[
        "watch",
        "--server",
        &server,
        "--token",
        TOKEN,
        mark_id,
        "--out",
        &again.to_string_lossy(),
    ])
    .await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr_of(&output));
    let listed: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    let expected: Vec<String> = images
        .iter()
        .map(|i| {
            again
                .join(i["name"].as_str().expect("name"))
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(listed, expected);
    for path in &listed {
        assert_eq!(png_size(Path::new(path)), (200, 120));
    }
}

/// An image host for the failure cases, on loopback: `/ok.png` answers a
/// whole body; `/cut.png` promises 100000 bytes, sends 5000 and closes;
/// `/slow.png` trickles 64 KiB over about a second.
async fn image_host() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&request);
                let path = head
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or_default()
                    .to_owned();
                let header = |len: usize| {
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: image/png\r\ncontent-length: {len}\r\nconnection: close\r\n\r\n"
                    )
                };
                let _ = match path.as_str() {
                    "/ok.png" => {
                        socket.write_all(header(2000).as_bytes()).await.ok();
                        socket.write_all(&[7u8; 2000]).await
                    }
                    "/cut.png" => {
                        socket.write_all(header(100_000).as_bytes()).await.ok();
                        socket.write_all(&[7u8; 5000]).await
                    }
                    "/slow.png" => {
                        socket.write_all(header(64 * 1024).as_bytes()).await.ok();
                        for _ in 0..16 {
                            tokio::time::sleep(Duration::from_millis(60)).await;
                            if socket.write_all(&[7u8; 4096]).await.is_err() {
                                break;
                            }
                        }
                        Ok(())
                    }
                    _ => {
                        socket
                            .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                            .await
                    }
                };
                let _ = socket.shutdown().await;
            });
        }
    });
    format!("http://{addr}")
}

/// Makes the simulator report `mark_id` of `token` as succeeded with these
/// images (`(url, name)`), 64x48 each: a scripted status reply.
async fn script_success(h: &Harness, token: &str, mark_id: &str, images: &[(&str, &str)]) {
    let images: Vec<Value> = images
        .iter()
        .map(|(url, name)| json!({"imgUrl": url, "imgName": name, "realWidth": 64, "realHeight": 48}))
        .collect();
    let body = json!({
        "status": 0,
        "message": "success",
        "data": [{"markId": mark_id, "status": "success", "promptId": "p1", "img_urls": images}],
    });
    h.sim
        .script(json!([{
            "endpoint": "status",
            "token": token,
            "times": 100,
            "http_status": 200,
            "body": body.to_string(),
        }]))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_download_exits_3_and_leaves_no_file() {
    let h = Harness::start().await;
    let server = format!("http://{}", h.server.addr);
    let host = image_host().await;
    let refused = format!("http://{}/x.png", unused_addr());
    let ok = format!("{host}/ok.png");
    let cut = format!("{host}/cut.png");
    let missing = format!("{host}/missing.png");
    let cases = [
        ("dl-404", missing.as_str(), "answered HTTP 404 Not Found"),
        ("dl-cut", cut.as_str(), "the connection broke after"),
        ("dl-refused", refused.as_str(), "cannot connect"),
    ];
    let scratch = tempfile::tempdir().expect("tempdir");
    for (token, bad_url, says) in cases {
        // The first image downloads fine; the second fails: all or nothing.
        let mark_id = format!("mark-{token}");
        script_success(
            &h,
            token,
            &mark_id,
            &[(&ok, "first.png"), (bad_url, "second.png")],
        )
        .await;
        let dir = scratch.path().join(token);
        let dir_text = dir.to_string_lossy().into_owned();
        let output = run_client(&[
            "watch", "--server", &server, "--token", token, &mark_id, "--out", &dir_text, "--json",
        ])
        .await;
        let stderr = stderr_of(&output);
        assert_eq!(output.status.code(), Some(3), "{token}: {stderr}");
        assert!(
            output.stdout.is_empty(),
            "{token}: no JSON after a failed download"
        );
        assert!(
            stderr.contains(says) && stderr.contains(bad_url),
            "{token}: {stderr}"
        );
        assert!(dir.is_dir(), "{token}: --out creates the directory");
        assert_eq!(
            files_in(&dir),
            Vec::<String>::new(),
            "{token}: no file left"
        );
    }

    // A file already in DIR is left alone by a failed download.
    let dir = scratch.path().join("kept");
    std::fs::create_dir(&dir).expect("mkdir");
    std::fs::write(dir.join("notes.txt"), "mine").expect("write");
    script_success(&h, "dl-keep", "mark-keep", &[(&cut, "x.png")]).await;
    let dir_text = dir.to_string_lossy().into_owned();
    let output = run_client(&[
        "watch",
        "--server",
        &server,
        "--token",
        "dl-keep",
        "mark-keep",
        "--out",
        &dir_text,
    ])
    .await;
    assert_eq!(output.status.code(), Some(3), "{}", stderr_of(&output));
    assert_eq!(files_in(&dir), ["notes.txt"]);

    // The same job's images from a working host: saved under safe names,
    // the paths in the JSON.
    script_success(
        &h,
        "dl-ok",
        "mark-ok",
        &[(&ok, "../escape.png"), (&ok, "../escape.png")],
    )
    .await;
    let dir = scratch.path().join("ok");
    let dir_text = dir.to_string_lossy().into_owned();
    let output = run_client(&[
        "watch", "--server", &server, "--token", "dl-ok", "mark-ok", "--out", &dir_text, "--json",
    ])
    .await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr_of(&output));
    assert_eq!(files_in(&dir), ["_escape-2.png", "_escape.png"]);
    let job = one_json_object(&output.stdout);
    assert_eq!(
        job["images"][0]["path"],
        dir.join("_escape.png").to_string_lossy().as_ref()
    );
    assert_eq!(
        job["images"][1]["path"],
        dir.join("_escape-2.png").to_string_lossy().as_ref()
    );
    assert_eq!(
        std::fs::read(dir.join("_escape.png")).expect("read"),
        vec![7u8; 2000]
    );
    assert!(
        files_in(scratch.path())
            .iter()
            .all(|n| !n.contains("escape")),
        "nothing outside DIR"
    );
}

// === The terminal display, through a pseudo-terminal ===

/// A pseudo-terminal of 40 rows and 120 columns.
struct Pty {
    master: std::fs::File,
    terminal: std::fs::File,
}

fn open_pty() -> Pty {
    use rustix::{
        fs::{Mode, OFlags},
        pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt},
        termios::{Winsize, tcsetwinsize},
    };
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)
        .expect("open a pseudo-terminal");
    grantpt(&master).expect("grantpt");
    unlockpt(&master).expect("unlockpt");
    let name = ptsname(&master, Vec::new()).expect("ptsname");
    let terminal = rustix::fs::open(
        name.as_c_str(),
        OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .expect("open the terminal side");
    let size = Winsize {
        ws_row: 40,
        ws_col: 120,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    tcsetwinsize(&terminal, size).expect("set the window size");
    Pty {
        master: master.into(),
        terminal: terminal.into(),
    }
}

/// Runs the client with stderr on a terminal (stdout too when
/// `stdout_on_terminal`, else piped) and returns how it exited, its piped
/// stdout, and everything the terminal received.
fn run_on_terminal(args: &[&str], stdout_on_terminal: bool) -> (ExitStatus, Vec<u8>, String) {
    let pty = open_pty();
    let mut master = pty.master;
    let reader = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        // Ends with EIO (Linux) or EOF once the last terminal-side fd closes.
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
        }
        seen
    });
    let mut command = client(args);
    command
        .env("TERM", "xterm-256color")
        .stdin(Stdio::null())
        .stderr(pty.terminal.try_clone().expect("dup"));
    if stdout_on_terminal {
        command.stdout(pty.terminal);
    } else {
        command.stdout(Stdio::piped());
        drop(pty.terminal);
    }
    let mut child = command.spawn().expect("spawn on the terminal");
    drop(command);
    let mut stdout = Vec::new();
    if let Some(mut out) = child.stdout.take() {
        out.read_to_end(&mut stdout).expect("read stdout");
    }
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("the client did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let seen = reader.join().expect("terminal reader");
    (status, stdout, String::from_utf8_lossy(&seen).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_gets_live_progress_while_stdout_stays_clean_json() {
    let h = Harness::start().await;
    let server = format!("http://{}", h.server.addr);
    let scratch = tempfile::tempdir().expect("tempdir");
    let dir = scratch.path().join("images");
    let args = [
        "generate",
        "--server",
        &server,
        "--token",
        TOKEN,
        "a magical landscape",
        "--wait",
        "--json",
        "--width",
        "160",
        "--height",
        "120",
        "--out",
        &dir.to_string_lossy(),
    ]
    .map(str::to_owned);
    let (status, stdout, screen) = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_on_terminal(&args, false)
    })
    .await
    .expect("join");
    assert!(status.success(), "{screen}");
    let job = one_json_object(&stdout);
    assert_eq!(job["state"], "SUCCEEDED");
    let name = job["images"][0]["name"].as_str().expect("name").to_owned();
    // The spinner redraws one line in place (carriage return, clear line)
    // instead of printing a line per change.
    assert!(screen.contains("pending, queue position"), "{screen:?}");
    assert!(
        screen.contains("\r\u{1b}[2K"),
        "no in-place redraw: {screen:?}"
    );
    assert!(
        !screen.contains("succeeded, 1 image(s)\r\n"),
        "the terminal got plain lines: {screen:?}"
    );
    // The download drew its bar, then said where the image went.
    assert!(
        screen.contains(&format!("{name} [")),
        "no download bar: {screen:?}"
    );
    let saved = dir.join(&name);
    assert!(
        screen.contains(&format!("saved {}", saved.display())),
        "{screen:?}"
    );
    assert!(
        !screen.contains("\"mark_id\""),
        "JSON leaked to the terminal"
    );
    assert_eq!(png_size(&saved), (160, 120));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_shows_a_download_bar_for_out() {
    let h = Harness::start().await;
    let server = format!("http://{}", h.server.addr);
    let host = image_host().await;
    let slow = format!("{host}/slow.png");
    script_success(&h, "tty", "mark-tty", &[(&slow, "slow.png")]).await;
    let scratch = tempfile::tempdir().expect("tempdir");
    let dir = scratch.path().join("images");
    let args = [
        "watch",
        "--server",
        &server,
        "--token",
        "tty",
        "mark-tty",
        "--out",
        &dir.to_string_lossy(),
    ]
    .map(|s| s.to_owned());
    let (status, _, screen) = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_on_terminal(&args, true)
    })
    .await
    .expect("join");
    assert!(status.success(), "{screen}");
    // The bar names the file and counts bytes against the total.
    assert!(screen.contains("slow.png ["), "no download bar: {screen:?}");
    assert!(screen.contains("/64.00 KiB"), "no byte count: {screen:?}");
    let saved = dir.join("slow.png");
    assert!(
        screen.contains(&format!("saved {}", saved.display())),
        "{screen:?}"
    );
    assert!(
        screen.contains(&format!("{}\r\n", saved.display())),
        "the path on stdout: {screen:?}"
    );
    assert_eq!(std::fs::metadata(&saved).expect("saved").len(), 64 * 1024);
}
