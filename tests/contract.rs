//! The Piclumen contract of `shared/UPSTREAM.md`, checked against fixtures
//! kept beside this file: the client decodes its example replies, the
//! server's create body and the simulator's replies carry exactly its field
//! names, and the configurable headers reach Piclumen.

mod common;

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use common::*;
use piclumen_grpc::pb::{self, image_service_client::ImageServiceClient};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_piclumen-grpc");

/// The binary, killed (by its own handle) when dropped.
struct Running {
    child: Child,
    addr: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the binary with `args` and waits for its `listening on ADDR` line.
fn start_binary(args: &[&str]) -> Running {
    let mut command = Command::new(BIN);
    // Only the flags given here: no setting leaks in from the environment.
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("PICLUMEN_") || name == "PORT" {
            command.env_remove(name);
        }
    }
    let mut child = command
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
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
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("listening line");
    Running { child, addr }
}

#[tokio::test]
async fn user_agent_origin_and_referer_flags_reach_both_endpoints() {
    let sim = Sim::start(sim_config()).await;
    let upstream = sim.url();
    let server = start_binary(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--upstream-url",
        &upstream,
        "--user-agent",
        "Mozilla/5.0 (test agent)",
        "--origin",
        "https://app.example",
        "--referer",
        "https://app.example/create",
    ]);
    let mut client = ImageServiceClient::connect(format!("http://{}", server.addr))
        .await
        .expect("connect");
    let mark_id = start_job(&mut client, TOKEN, "p").await;
    client
        .check_image(authed(TOKEN, pb::CheckImageRequest { mark_id }))
        .await
        .expect("check");

    let expected = json!({
        "platform": "Web",
        "content-type": "application/json;charset=UTF-8",
        "accept": "application/json",
        "user-agent": "Mozilla/5.0 (test agent)",
        "origin": "https://app.example",
        "referer": "https://app.example/create",
        "authorization": true,
    });
    assert_eq!(sim.creates().await[0]["headers"], expected);
    let requests = sim_get(&sim, "/_sim/requests").await;
    assert_eq!(requests["create"], expected);
    assert_eq!(requests["status"], expected);
}

#[tokio::test]
async fn without_the_flags_only_the_default_user_agent_is_sent() {
    let h = Harness::start().await;
    let mut client = h.client().await;
    let mark_id = start_job(&mut client, TOKEN, "p").await;
    client
        .check_image(authed(TOKEN, pb::CheckImageRequest { mark_id }))
        .await
        .expect("check");
    let requests = sim_get(&h.sim, "/_sim/requests").await;
    for endpoint in ["create", "status"] {
        let seen = &requests[endpoint];
        assert_eq!(
            seen["user-agent"],
            concat!("piclumen-grpc/", env!("CARGO_PKG_VERSION")),
            "{endpoint}"
        );
        assert_eq!(seen["origin"], Value::Null, "{endpoint}");
        assert_eq!(seen["referer"], Value::Null, "{endpoint}");
        assert_eq!(seen["authorization"], true, "{endpoint}");
        assert!(
            !seen.to_string().contains(TOKEN),
            "{endpoint}: the token is never recorded: {seen}"
        );
    }
}

/// A simulator JSON page.
async fn sim_get(sim: &Sim, path: &str) -> Value {
    let reply = sim
        .http
        .get(format!("{}{path}", sim.url()))
        .send()
        .await
        .expect("sim get");
    assert!(reply.status().is_success(), "{path}: {}", reply.status());
    let body = reply.bytes().await.expect("sim body");
    serde_json::from_slice(&body).expect("sim json")
}
