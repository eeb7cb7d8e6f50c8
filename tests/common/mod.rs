//! Test harness: a simulator and a server on loopback port 0, each with its
//! own shutdown, plus helpers for clients, metadata and simulator stats;
//! the binary itself is started through [`process`].
#![allow(dead_code, unreachable_pub, missing_docs)]

pub mod args;
pub mod client;
pub mod http;
pub mod process;

use std::{net::SocketAddr, time::Duration};

use piclumen_grpc::{
    hub::HubConfig,
    job::Token,
    pb::{self, image_service_client::ImageServiceClient},
    server::{self, ServerConfig},
    service::ServiceConfig,
    sim::{self, SimConfig},
    upstream::{Client, ClientConfig},
};
use serde_json::Value;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::{Code, Request, Status, transport::Channel};
use tonic_types::StatusExt;

pub use process::Process;

/// Token every test uses unless it says otherwise.
pub const TOKEN: &str = "token-a";
/// A second account.
pub const OTHER_TOKEN: &str = "token-b";

/// Simulator settings whose jobs outlast any test: for watches that must
/// stay open.
pub fn long_jobs() -> SimConfig {
    SimConfig {
        job_duration: Duration::from_secs(30),
        ..sim_config()
    }
}

/// Longest wait of the helpers below for a call or a stream to end: far
/// beyond any test's needs, so that a stall fails the test with a message
/// instead of hanging the suite.
pub const STALL_BOUND: Duration = Duration::from_secs(60);

/// Awaits `future` for at most [`STALL_BOUND`]; panics naming `what` past it.
pub async fn bounded<F: std::future::Future>(what: &str, future: F) -> F::Output {
    match tokio::time::timeout(STALL_BOUND, future).await {
        Ok(output) => output,
        Err(_) => panic!("{what}: stalled, no end within {STALL_BOUND:?}"),
    }
}

/// Reads a stream to its end: `None` when it ended OK, else the status.
pub async fn final_status<T>(stream: &mut tonic::Streaming<T>) -> Option<Status> {
    bounded("reading a stream to its end", async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(status) => return Some(status),
            }
        }
    })
    .await
}

/// Simulator settings fast enough for tests.
pub fn sim_config() -> SimConfig {
    SimConfig {
        job_duration: Duration::from_millis(1200),
        ..SimConfig::default()
    }
}

/// Server settings fast enough for tests.
pub fn server_config() -> ServerConfig {
    ServerConfig {
        service: ServiceConfig {
            max_watch: Duration::from_secs(60),
            max_watches: 20_000,
            ..Default::default()
        },
        hub: HubConfig {
            poll_interval: Duration::from_millis(200),
            gather: Duration::from_millis(20),
            failure_budget: Duration::from_secs(5),
            ..Default::default()
        },
        drain_timeout: Duration::from_secs(5),
        ..Default::default()
    }
}

pub fn client_config(base_url: String) -> ClientConfig {
    ClientConfig {
        base_url: base_url.into(),
        timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(2),
        ..Default::default()
    }
}

/// A running simulator.
pub struct Sim {
    pub addr: SocketAddr,
    pub http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Sim {
    pub async fn start(config: SimConfig) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind sim");
        let addr = listener.local_addr().expect("sim addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            sim::serve(listener, config, async {
                let _ = stopped.await;
            })
            .await
            .expect("sim serve");
        });
        Self {
            addr,
            http: reqwest::Client::new(),
            stop: Some(stop),
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn stats(&self) -> Value {
        self.get("/_sim/stats").await
    }

    pub async fn stat(&self, name: &str) -> u64 {
        self.stats().await[name].as_u64().expect("numeric stat")
    }

    pub async fn creates(&self) -> Value {
        self.get("/_sim/creates").await
    }

    async fn get(&self, path: &str) -> Value {
        self.http
            .get(format!("{}{path}", self.url()))
            .send()
            .await
            .expect("sim get")
            .bytes()
            .await
            .map(|b| serde_json::from_slice(&b).expect("sim json"))
            .expect("sim body")
    }

    /// Scripts the simulator's next replies (see `sim::Fault`).
    pub async fn script(&self, faults: Value) {
        let (status, why) = self.post_faults(&faults).await;
        assert!(
            status.is_success(),
            "scripting faults failed: {status}: {why}"
        );
    }

    /// Posts `faults` to the simulator's script endpoint, accepted or not:
    /// the reply's status and body.
    pub async fn post_faults(&self, faults: &Value) -> (reqwest::StatusCode, String) {
        let reply = self
            .http
            .post(format!("{}/_sim/faults", self.url()))
            .header("content-type", "application/json")
            .body(faults.to_string())
            .send()
            .await
            .expect("post faults");
        let status = reply.status();
        (status, reply.text().await.unwrap_or_default())
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}

/// A running gRPC server.
pub struct Server {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    pub task: JoinHandle<Result<(), server::ServerError>>,
}

impl Server {
    pub async fn start(config: ServerConfig, upstream_url: String) -> Self {
        let client = Client::new(&client_config(upstream_url)).expect("client");
        Self::start_with_client(config, client).await
    }

    pub async fn start_with_client(config: ServerConfig, client: Client) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind server");
        let addr = listener.local_addr().expect("server addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(config, client, listener, async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            stop: Some(stop),
            task,
        }
    }

    pub async fn channel(&self) -> Channel {
        channel_to(self.addr).await
    }

    pub async fn client(&self) -> ImageServiceClient<Channel> {
        ImageServiceClient::new(self.channel().await)
    }

    /// Starts the drain, as SIGTERM does.
    pub fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
        self.task.abort();
    }
}

/// A simulator and a server pointed at it.
pub struct Harness {
    pub sim: Sim,
    pub server: Server,
}

impl Harness {
    pub async fn start() -> Self {
        Self::with(sim_config(), server_config()).await
    }

    pub async fn with(sim: SimConfig, config: ServerConfig) -> Self {
        let sim = Sim::start(sim).await;
        let server = Server::start(config, sim.url()).await;
        Self { sim, server }
    }

    /// A simulator and a server whose upstream calls time out after
    /// `timeout`.
    pub async fn with_upstream_timeout(timeout: Duration) -> Self {
        let sim = Sim::start(sim_config()).await;
        let mut upstream = client_config(sim.url());
        upstream.timeout = timeout;
        let client = Client::new(&upstream).expect("client");
        let server = Server::start_with_client(server_config(), client).await;
        Self { sim, server }
    }

    pub async fn client(&self) -> ImageServiceClient<Channel> {
        self.server.client().await
    }

    /// The server's URL, as the client subcommands take it in `--server`.
    pub fn url(&self) -> String {
        format!("http://{}", self.server.addr)
    }
}

/// A plaintext HTTP/2 channel to `addr` (a server, or a proxy in front of
/// one).
pub async fn channel_to(addr: impl std::fmt::Display) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect")
}

/// A request carrying `authorization: Bearer <token>`.
pub fn authed<T>(token: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii token"),
    );
    request
}

pub fn generate(prompt: &str) -> pb::GenerateImageRequest {
    pb::GenerateImageRequest {
        prompt: prompt.into(),
        ..Default::default()
    }
}

/// A plain CheckImage of `mark_id` (no wait).
pub fn check_request(mark_id: impl Into<String>) -> pb::CheckImageRequest {
    pb::CheckImageRequest {
        mark_id: mark_id.into(),
        ..Default::default()
    }
}

/// Starts one job and returns its mark id.
pub async fn start_job(
    client: &mut ImageServiceClient<Channel>,
    token: &str,
    prompt: &str,
) -> String {
    bounded(
        "GenerateImage",
        client.generate_image(authed(token, generate(prompt))),
    )
    .await
    .expect("generate")
    .into_inner()
    .mark_id
}

/// Opens a watch of `mark_id` and reads its first message (the job's
/// state), so the server holds the watch from here on; returns the stream
/// and that message.
pub async fn open_watch(
    client: &mut ImageServiceClient<Channel>,
    token: &str,
    mark_id: String,
) -> (
    tonic::Streaming<pb::WatchImageResponse>,
    pb::WatchImageResponse,
) {
    let mut stream = client
        .watch_image(authed(token, pb::WatchImageRequest { mark_id }))
        .await
        .expect("watch")
        .into_inner();
    let first = stream.message().await.expect("first").expect("message");
    (stream, first)
}

/// Follows a watch to its end: every message, then how the stream ended.
pub async fn collect_watch(
    client: &mut ImageServiceClient<Channel>,
    token: &str,
    mark_id: &str,
) -> (Vec<pb::WatchImageResponse>, Result<(), Status>) {
    let request = authed(
        token,
        pb::WatchImageRequest {
            mark_id: mark_id.into(),
        },
    );
    bounded(&format!("watching {mark_id}"), async {
        let mut stream = match client.watch_image(request).await {
            Ok(response) => response.into_inner(),
            Err(status) => return (Vec::new(), Err(status)),
        };
        let mut messages = Vec::new();
        loop {
            match stream.message().await {
                Ok(Some(m)) => messages.push(m),
                Ok(None) => return (messages, Ok(())),
                Err(status) => return (messages, Err(status)),
            }
        }
    })
    .await
}

pub fn states(messages: &[pb::WatchImageResponse]) -> Vec<pb::JobState> {
    messages
        .iter()
        .map(|m| m.job.as_ref().expect("job").state())
        .collect()
}

/// Asserts a status's code and its `ErrorInfo.reason`.
pub fn assert_status(status: &Status, code: Code, reason: &str) {
    assert_eq!(status.code(), code, "unexpected status: {status:?}");
    let details = status.get_error_details();
    let info = details.error_info().expect("ErrorInfo detail");
    assert_eq!(info.reason, reason, "unexpected reason in {status:?}");
    assert_eq!(info.domain, "piclumen-grpc");
}

pub fn token(raw: &str) -> Token {
    Token::new(raw).expect("token")
}

/// `serve --simulate` on a free loopback port, its jobs fast enough for
/// tests: one second long, polled every 250 ms.
pub const SIMULATE_FAST: &[&str] = &[
    "--simulate",
    "--listen",
    "127.0.0.1:0",
    "--sim-job-duration",
    "1s",
    "--poll-interval",
    "250ms",
];

/// A loopback address that was just free: nothing listens there.
pub fn unused_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr")
}

/// Asserts that GenerateImage and CheckImage both fail with `code`/`reason`.
pub async fn assert_unary_calls_fail(
    client: &mut ImageServiceClient<Channel>,
    code: Code,
    reason: &str,
) {
    let status = bounded(
        "GenerateImage",
        client.generate_image(authed(TOKEN, generate("p"))),
    )
    .await
    .expect_err("GenerateImage should fail");
    assert_status(&status, code, reason);
    let check = pb::CheckImageRequest {
        mark_id: "m".into(),
        ..Default::default()
    };
    let status = bounded("CheckImage", client.check_image(authed(TOKEN, check)))
        .await
        .expect_err("CheckImage should fail");
    assert_status(&status, code, reason);
}

/// Sends `request` to GenerateImage, which must refuse it with `code` and
/// `reason`; returns the status for the caller's further checks.
pub async fn generate_refused(
    client: &mut ImageServiceClient<Channel>,
    request: Request<pb::GenerateImageRequest>,
    code: Code,
    reason: &str,
) -> Status {
    let status = client
        .generate_image(request)
        .await
        .expect_err("GenerateImage should fail");
    assert_status(&status, code, reason);
    status
}

/// GenerateImage as `token` without an `x-api-key` is refused:
/// UNAUTHENTICATED, `API_KEY_MISSING`.
pub async fn assert_api_key_missing(client: &mut ImageServiceClient<Channel>, token: &str) {
    let request = authed(token, generate("p"));
    generate_refused(client, request, Code::Unauthenticated, "API_KEY_MISSING").await;
}

/// Polls `check` every 20 ms until it holds, for at most `limit`.
pub async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < end {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    check().await
}

/// Log output captured in memory (install it with a tracing subscriber's
/// `with_writer`), so a test can read what the server logged.
#[derive(Clone, Default)]
pub struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Captured {
    /// The log of this test binary: a global subscriber, installed on first
    /// use, writing events at `filter` as JSON lines (when `json`) and as
    /// plain text lines, both here.
    pub fn global(filter: &str, json: bool) -> &'static Captured {
        use tracing_subscriber::{EnvFilter, fmt, layer::SubscriberExt, util::SubscriberInitExt};
        static LOGS: std::sync::OnceLock<Captured> = std::sync::OnceLock::new();
        LOGS.get_or_init(|| {
            let captured = Captured::default();
            tracing_subscriber::registry()
                .with(EnvFilter::new(filter))
                .with(json.then(|| fmt::layer().json().with_writer(captured.clone())))
                .with(fmt::layer().with_ansi(false).with_writer(captured.clone()))
                .init();
            captured
        })
    }

    /// Everything written so far, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log buffer")).into_owned()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Process {
    /// A gRPC client of this process (a `serve`).
    pub async fn client(&self) -> ImageServiceClient<Channel> {
        ImageServiceClient::connect(format!("http://{}", self.addr))
            .await
            .expect("connect")
    }
}
