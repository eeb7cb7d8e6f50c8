//! `--idempotency-store redis://` against a real `redis-server` (Debian's
//! package, installed by `scripts/redis.sh` when missing): each test starts
//! its own server on a free loopback port with persistence off, two
//! replicas and one simulator. A missing redis-server that cannot be
//! installed fails these tests; it never skips them.

mod common;

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::Duration,
};

use common::*;
use piclumen_grpc::{idempotency::StoreLocation, pb, server::ServerConfig};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use serde_json::json;
use tonic::{Code, Request};
use tracing_subscriber::{EnvFilter, layer::SubscriberExt, util::SubscriberInitExt};

/// The `redis-server` binary, installed once per test run when missing.
fn redis_server_binary() -> &'static PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/redis.sh");
        let output = Command::new("bash")
            .arg(script)
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/redis.sh");
        assert!(
            output.status.success(),
            "redis-server is missing and scripts/redis.sh could not install it ({})",
            output.status
        );
        let path = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        assert!(!path.is_empty(), "scripts/redis.sh named no binary");
        PathBuf::from(path)
    })
}

/// A `redis-server` child on a loopback port, killed (by its own handle)
/// when dropped.
struct Redis {
    port: u16,
    child: Option<Child>,
    _dir: TempDir,
}

impl Redis {
    fn start() -> Self {
        Self::start_on(unused_addr().port())
    }

    fn start_on(port: u16) -> Self {
        let dir = TempDir::new("redis");
        let redis = Self::spawn(port, &["--port", &port.to_string()], dir);
        redis.wait_ready(|| ping(port));
        redis
    }

    /// A server speaking TLS only, with a certificate for 127.0.0.1 signed
    /// by a CA made here; returns it and the CA's PEM file.
    fn start_tls() -> (Self, PathBuf) {
        let port = unused_addr().port();
        let dir = TempDir::new("redis-tls");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca =
            CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("ca");
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .expect("params")
            .signed_by(&key, &ca)
            .expect("sign");
        let file = |name: &str, text: String| {
            let path = dir.0.join(name);
            std::fs::write(&path, text).expect("write pem");
            path.to_string_lossy().into_owned()
        };
        let ca_file = file("ca.pem", ca.pem());
        let cert_file = file("server.pem", cert.pem());
        let key_file = file("server.key", key.serialize_pem());
        let args = [
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--tls-cert-file",
            &cert_file,
            "--tls-key-file",
            &key_file,
            "--tls-ca-cert-file",
            &ca_file,
            "--tls-auth-clients",
            "no",
        ];
        let redis = Self::spawn(port, &args, dir);
        redis.wait_ready(|| TcpStream::connect(("127.0.0.1", port)).is_ok());
        (redis, PathBuf::from(ca_file))
    }

    fn spawn(port: u16, args: &[&str], dir: TempDir) -> Self {
        let child = Command::new(redis_server_binary())
            .args(args)
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir.0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        Self {
            port,
            child: Some(child),
            _dir: dir,
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn location(&self) -> StoreLocation {
        self.url().parse().expect("redis url")
    }

    /// `ready` holds within 10 s, or the test fails.
    fn wait_ready(&self, ready: impl Fn() -> bool) {
        let end = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if ready() {
                return;
            }
            assert!(
                std::time::Instant::now() < end,
                "redis-server did not come up on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server, as a crash or an outage would.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

fn ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut reply = [0u8; 7];
    stream.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
}

/// A directory removed when dropped (redis-server wants a working dir).
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "piclumen-{name}-{}-{:x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&path).expect("temp dir");
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn shared(redis: &Redis) -> ServerConfig {
    let mut config = server_config();
    config.service.idempotency_store = redis.location();
    config
}

fn with_id(prompt: &str, id: &str) -> pb::GenerateImageRequest {
    pb::GenerateImageRequest {
        request_id: id.into(),
        ..generate(prompt)
    }
}

fn call(token: &str, id: &str, timeout: Duration) -> Request<pb::GenerateImageRequest> {
    let mut request = authed(token, with_id("p", id));
    request.set_timeout(timeout);
    request
}

fn logs() -> &'static Captured {
    static LOGS: OnceLock<Captured> = OnceLock::new();
    LOGS.get_or_init(|| {
        let captured = Captured::default();
        tracing_subscriber::registry()
            .with(EnvFilter::new("info"))
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(captured.clone()),
            )
            .init();
        captured
    })
}

/// Log lines containing every one of `parts`.
fn log_lines(parts: &[&str]) -> usize {
    let text = logs().text();
    text.lines()
        .filter(|line| parts.iter().all(|p| line.contains(p)))
        .count()
}

#[tokio::test]
async fn a_request_id_done_on_one_replica_is_returned_by_another() {
    let redis = Redis::start();
    let sim = Sim::start(sim_config()).await;
    let a = Server::start(shared(&redis), sim.url()).await;
    let b = Server::start(shared(&redis), sim.url()).await;
    let (mut a, mut b) = (a.client().await, b.client().await);

    let first = a
        .generate_image(call(TOKEN, "across", Duration::from_secs(5)))
        .await
        .expect("created on A")
        .into_inner();
    let retry = b
        .generate_image(call(TOKEN, "across", Duration::from_secs(5)))
        .await
        .expect("B returns A's outcome")
        .into_inner();
    assert_eq!(retry, first, "same mark id and seed");
    assert_eq!(sim.stat("create_calls").await, 1);

    // The same key with other parameters is refused on any replica.
    let status = b
        .generate_image(authed(TOKEN, with_id("other prompt", "across")))
        .await
        .expect_err("other parameters");
    assert_status(&status, Code::InvalidArgument, "INVALID_REQUEST");
    // Another token's key is another generation.
    let other = b
        .generate_image(call(OTHER_TOKEN, "across", Duration::from_secs(5)))
        .await
        .expect("other token")
        .into_inner();
    assert_ne!(other.mark_id, first.mark_id);
    assert_eq!(sim.stat("create_calls").await, 2);
}

#[tokio::test]
async fn one_request_id_sent_to_two_replicas_at_once_creates_once() {
    let redis = Redis::start();
    let sim = Sim::start(sim_config()).await;
    let a = Server::start(shared(&redis), sim.url()).await;
    let b = Server::start(shared(&redis), sim.url()).await;
    // Each create takes 1 s: a second one would surely overlap the first.
    sim.script(json!([{"endpoint": "create", "delay_ms": 1000, "times": 2}]))
        .await;
    let mut handles = Vec::new();
    for server in [&a, &b] {
        let mut client = server.client().await;
        handles.push(tokio::spawn(async move {
            client
                .generate_image(call(TOKEN, "together", Duration::from_secs(10)))
                .await
        }));
    }
    let mut results = Vec::new();
    for handle in handles {
        results.push(handle.await.expect("join").expect("created").into_inner());
    }
    assert_eq!(
        results[0], results[1],
        "both callers get one mark id and seed"
    );
    assert_eq!(sim.stat("create_calls").await, 1);
}

#[tokio::test]
async fn a_redis_outage_fails_request_ids_closed_and_heals() {
    logs();
    let mut redis = Redis::start();
    let port = redis.port.to_string();
    let sim = Sim::start(sim_config()).await;
    let a = Server::start(shared(&redis), sim.url()).await;
    let mut client = a.client().await;
    let before = client
        .generate_image(call(TOKEN, "before", Duration::from_secs(5)))
        .await
        .expect("store up")
        .into_inner();
    assert_eq!(sim.stat("create_calls").await, 1);

    redis.stop();
    for n in 0..3 {
        let status = client
            .generate_image(call(TOKEN, &format!("during-{n}"), Duration::from_secs(10)))
            .await
            .expect_err("no store, no create");
        assert_status(&status, Code::Unavailable, "IDEMPOTENCY_STORE_UNAVAILABLE");
    }
    assert_eq!(sim.stat("create_calls").await, 1, "nothing was created");
    assert_eq!(
        log_lines(&["idempotency store unreachable", &port]),
        1,
        "one log line per outage"
    );
    assert_eq!(
        log_lines(&["WARN", "request_id store is unreachable"]),
        0,
        "no warning per call"
    );

    // Everything without a request_id goes on.
    let plain = client
        .generate_image(authed(TOKEN, generate("no key")))
        .await
        .expect("no request_id, no store")
        .into_inner();
    assert_eq!(sim.stat("create_calls").await, 2);
    client
        .check_image(authed(
            TOKEN,
            pb::CheckImageRequest {
                mark_id: before.mark_id.clone(),
            },
        ))
        .await
        .expect("CheckImage works");
    let (_, end) = collect_watch(&mut client, TOKEN, &plain.mark_id).await;
    end.expect("WatchImage works");

    // Redis comes back on the same port: the store heals by itself.
    let _redis = Redis::start_on(redis.port);
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    let healed = loop {
        match client
            .generate_image(call(TOKEN, "after", Duration::from_secs(5)))
            .await
        {
            Ok(r) => break r.into_inner(),
            Err(status) => {
                assert_status(&status, Code::Unavailable, "IDEMPOTENCY_STORE_UNAVAILABLE");
                assert!(
                    tokio::time::Instant::now() < end,
                    "the store did not recover once Redis was back"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let again = client
        .generate_image(call(TOKEN, "after", Duration::from_secs(5)))
        .await
        .expect("kept in the restarted Redis")
        .into_inner();
    assert_eq!(again, healed);
    assert_eq!(sim.stat("create_calls").await, 3);
    assert_eq!(
        log_lines(&["idempotency store reachable again", &port]),
        1,
        "one log line on recovery"
    );
}

/// A replica: `serve --listen 127.0.0.1:0 ARGS...` as a child process.
type Replica = Process;

fn replica(args: &[&str], env: &[(&str, &str)]) -> Replica {
    Process::serve(&[&["--listen", "127.0.0.1:0"], args].concat(), env)
}

#[tokio::test]
async fn a_claim_whose_owner_died_expires() {
    let redis = Redis::start();
    let sim = Sim::start(sim_config()).await;
    let upstream = sim.url();
    // A 1 s upstream timeout: claims live 1 s plus the margin.
    let args = ["--upstream-url", &upstream, "--upstream-timeout", "1s"];
    let store = redis.url();
    let env = [("PICLUMEN_IDEMPOTENCY_STORE", store.as_str())];
    let mut owner = replica(&args, &env);
    let survivor = replica(&args, &env);
    sim.script(json!([{"endpoint": "create", "delay_ms": 3000}]))
        .await;
    let mut first = owner.client().await;
    let started = tokio::spawn(async move {
        first
            .generate_image(call(TOKEN, "orphan", Duration::from_secs(10)))
            .await
    });
    assert!(
        eventually(Duration::from_secs(5), || async {
            sim.stat("create_calls").await == 1
        })
        .await
    );
    // The owner dies with its create in flight; its claim stays behind.
    owner.kill();
    let _ = started.await;

    let mut client = survivor.client().await;
    let created = client
        .generate_image(call(TOKEN, "orphan", Duration::from_secs(20)))
        .await
        .expect("the claim expires and the survivor creates")
        .into_inner();
    assert!(!created.mark_id.is_empty());
    assert_eq!(sim.stat("create_calls").await, 2);
}

#[tokio::test]
async fn rediss_urls_speak_tls() {
    let (redis, ca) = Redis::start_tls();
    let sim = Sim::start(sim_config()).await;
    let upstream = sim.url();
    let store = format!("rediss://127.0.0.1:{}", redis.port);
    let ca = ca.to_string_lossy().into_owned();
    // The store trusts the system's roots; SSL_CERT_FILE points them at our CA.
    let env = [
        ("PICLUMEN_IDEMPOTENCY_STORE", store.as_str()),
        ("SSL_CERT_FILE", ca.as_str()),
    ];
    let a = replica(&["--upstream-url", &upstream], &env);
    let b = replica(&["--upstream-url", &upstream], &env);
    let first = a
        .client()
        .await
        .generate_image(call(TOKEN, "tls", Duration::from_secs(10)))
        .await
        .expect("created through a TLS store")
        .into_inner();
    let retry = b
        .client()
        .await
        .generate_image(call(TOKEN, "tls", Duration::from_secs(10)))
        .await
        .expect("the other replica reads it back")
        .into_inner();
    assert_eq!(retry, first);
    assert_eq!(sim.stat("create_calls").await, 1);
}
