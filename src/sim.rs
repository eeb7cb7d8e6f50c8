//! The Piclumen simulator: both upstream endpoints with Piclumen's JSON
//! shapes and behaviour, plus knobs and counters for tests and benchmarks.
//!
//! Jobs belong to the token that created them; each goes `pending` (queue
//! index falling) for the first 40% of `job_duration`, then `running`, then
//! `success` with `batch_size` images (or `failed` for prompts containing
//! `[sim:fail]`). `GET /_sim/stats` counts every request, injected faults
//! included; `POST /_sim/faults` scripts the next replies; `GET
//! /_sim/creates` shows the accepted creates, each as `{"headers", "body"}`;
//! `GET /_sim/requests` shows the headers of the latest request to each
//! endpoint, as `{"create": headers, "status": headers}` (`null` before the
//! first), whatever its reply; `GET /_sim/jobs` gives each job's creation
//! time and duration.
//!
//! A finished job's `imgUrl`s point at the simulator itself, at the address
//! the status request was sent to (its `Host` header):
//! `http://HOST/_sim/images/<markId>-<i>.png`, `imgName` being the last
//! part. `GET /_sim/images/<name>` answers a real PNG of the job's width and
//! height (a gradient), so images can be downloaded offline; a name of no
//! finished job's image gets 404.
//!
//! Recorded headers are an object with `platform`, `content-type`,
//! `accept`, `user-agent`, `origin` and `referer` (each the text sent, or
//! `null` when absent) and `authorization`: `true` when that header was
//! present. The token itself is never recorded.

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{
    Json, Router,
    body::{Body, Bytes},
    extract::{Path, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
    serve::ListenerExt,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::{net::TcpListener, time::Instant};

/// Simulator knobs.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Time from create to a finished job.
    pub job_duration: Duration,
    /// Each job's duration varies by up to this fraction either way (0 to 1).
    pub job_jitter: f64,
    /// Delay added to every API reply.
    pub latency: Duration,
    /// Share of API requests answered with a random 5xx.
    pub fail_5xx_rate: f64,
    /// Share of API requests answered 429 with `Retry-After: 1`.
    pub fail_429_rate: f64,
    /// Accepted tokens; empty accepts any non-empty token.
    pub tokens: Vec<String>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            job_duration: defaults::SIM_JOB_DURATION,
            job_jitter: defaults::SIM_JOB_JITTER,
            latency: defaults::SIM_LATENCY,
            fail_5xx_rate: defaults::SIM_FAIL_5XX_RATE,
            fail_429_rate: defaults::SIM_FAIL_429_RATE,
            tokens: Vec::new(),
        }
    }
}

/// The simulator's defaults (the `sim` flags and `serve --simulate` read
/// these).
pub mod defaults {
    use std::{
        net::{Ipv4Addr, SocketAddr, SocketAddrV4},
        time::Duration,
    };

    /// `sim --listen`.
    pub const SIM_LISTEN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080));
    /// `sim --job-duration` and `serve --sim-job-duration`.
    pub const SIM_JOB_DURATION: Duration = Duration::from_secs(6);
    /// `sim --job-jitter`.
    pub const SIM_JOB_JITTER: f64 = 0.0;
    /// `sim --latency`.
    pub const SIM_LATENCY: Duration = Duration::ZERO;
    /// `sim --fail-5xx-rate`.
    pub const SIM_FAIL_5XX_RATE: f64 = 0.0;
    /// `sim --fail-429-rate`.
    pub const SIM_FAIL_429_RATE: f64 = 0.0;
    /// Default token of `serve --simulate` when none is given, so the quick
    /// start works without one. The simulator accepts any token.
    pub const SIMULATOR_TOKEN: &str = "simulator-demo-token";
}

/// Piclumen's create path.
const CREATE_PATH: &str = "/api/gen/create";
/// Piclumen's batch status path.
const STATUS_PATH: &str = "/api/task/batch-process-task";
/// How many recent create bodies `/_sim/creates` keeps.
const KEEP_CREATES: usize = 200;
/// Queue index of a new job.
const QUEUE_START: i64 = 3;
/// Largest image side the simulator draws (the server's own limit).
const MAX_IMAGE_SIDE: i64 = 4096;
/// How many image sizes stay encoded in memory.
const KEEP_IMAGE_SIZES: usize = 16;
/// Where the image route lives.
const IMAGES_PATH: &str = "/_sim/images/";

/// A scripted reply, consumed by the next matching request(s).
///
/// Omitted keys take their defaults; an unknown key, an unknown endpoint,
/// an HTTP status out of range or a fault that would change nothing (no
/// `http_status`, `delay_ms` nor `reset`) gets the whole script refused
/// with HTTP 400 saying why, so a misspelled key cannot pass unnoticed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Fault {
    /// `create`, `status` or `any`.
    pub endpoint: String,
    /// Only requests with this token match (any when empty).
    pub token: String,
    /// How many requests it applies to (1 when 0).
    pub times: u32,
    /// Delay before replying, in milliseconds.
    pub delay_ms: u64,
    /// HTTP status to answer (the normal reply when 0).
    pub http_status: u16,
    /// Body of the answer (with `http_status`).
    pub body: String,
    /// Extra response headers.
    pub headers: HashMap<String, String>,
    /// Break the connection half-way through the body.
    pub reset: bool,
}

/// Request counters, as `/_sim/stats` reports them.
#[derive(Debug, Default)]
struct Stats {
    create_calls: AtomicU64,
    status_calls: AtomicU64,
    status_ids: AtomicU64,
    injected_5xx: AtomicU64,
    injected_429: AtomicU64,
    scripted_faults: AtomicU64,
    unauthorized: AtomicU64,
}

#[derive(Debug)]
struct Job {
    token: String,
    created: Instant,
    duration: Duration,
    batch_size: i64,
    width: i64,
    height: i64,
    fail: bool,
    nsfw: bool,
    prompt_id: String,
    /// Wall-clock creation time, for measurements across processes.
    created_unix_ms: u128,
}

#[derive(Debug, Default)]
struct World {
    jobs: HashMap<String, Job>,
    creates: VecDeque<Value>,
    faults: VecDeque<Fault>,
    /// Headers of the latest create and status requests.
    last_create: Option<Value>,
    last_status: Option<Value>,
}

#[derive(Debug, Clone)]
struct Sim {
    config: Arc<SimConfig>,
    stats: Arc<Stats>,
    world: Arc<Mutex<World>>,
    /// Encoded images by (width, height): every job of one size shares one.
    images: Arc<Mutex<HashMap<(u32, u32), Bytes>>>,
}

impl Sim {
    fn world(&self) -> MutexGuard<'_, World> {
        self.world
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn images(&self) -> MutexGuard<'_, HashMap<(u32, u32), Bytes>> {
        self.images
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The simulator's HTTP routes.
pub fn router(config: SimConfig) -> Router {
    let sim = Sim {
        config: Arc::new(config),
        stats: Arc::default(),
        world: Arc::default(),
        images: Arc::default(),
    };
    Router::new()
        .route(CREATE_PATH, post(create))
        .route(STATUS_PATH, post(status))
        .route("/_sim/stats", get(stats))
        .route("/_sim/faults", post(add_faults))
        .route("/_sim/creates", get(creates))
        .route("/_sim/requests", get(requests))
        .route("/_sim/jobs", get(jobs))
        .route("/_sim/images/{name}", get(image))
        .with_state(sim)
}

/// Serves the simulator on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    config: SimConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Without TCP_NODELAY small replies can wait on delayed ACKs (~40 ms).
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router(config))
        .with_graceful_shutdown(shutdown)
        .await
}

fn envelope(data: Value) -> Response {
    Json(json!({"status": 0, "message": "success", "data": data})).into_response()
}

fn reject(status: StatusCode, message: &str) -> Response {
    (
        status,
        Json(json!({"status": status.as_u16(), "message": message, "data": null})),
    )
        .into_response()
}

/// Latency, scripted faults, random faults and the token check, in the
/// order a request meets them; `Err` is the reply to send instead.
async fn gate(sim: &Sim, endpoint: &str, headers: &HeaderMap) -> Result<String, Response> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    if !sim.config.latency.is_zero() {
        tokio::time::sleep(sim.config.latency).await;
    }
    let fault = {
        let mut world = sim.world();
        take_fault(&mut world.faults, endpoint, &token)
    };
    if let Some(fault) = fault {
        sim.stats.scripted_faults.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(fault.delay_ms)).await;
        if let Some(reply) = fault_reply(&fault) {
            return Err(reply);
        }
    }
    let roll: f64 = rand::random();
    if roll < sim.config.fail_429_rate {
        sim.stats.injected_429.fetch_add(1, Ordering::Relaxed);
        let mut reply = reject(StatusCode::TOO_MANY_REQUESTS, "Too Many Requests");
        reply
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return Err(reply);
    }
    if roll < sim.config.fail_429_rate + sim.config.fail_5xx_rate {
        sim.stats.injected_5xx.fetch_add(1, Ordering::Relaxed);
        let codes = [
            StatusCode::INTERNAL_SERVER_ERROR,
            StatusCode::BAD_GATEWAY,
            StatusCode::SERVICE_UNAVAILABLE,
            StatusCode::GATEWAY_TIMEOUT,
        ];
        let code = codes[rand::random_range(0..codes.len())];
        return Err((code, "upstream trouble (simulated)").into_response());
    }
    let allowed =
        !token.is_empty() && (sim.config.tokens.is_empty() || sim.config.tokens.contains(&token));
    if !allowed {
        sim.stats.unauthorized.fetch_add(1, Ordering::Relaxed);
        return Err(reject(StatusCode::UNAUTHORIZED, "Unauthorized"));
    }
    Ok(token)
}

fn take_fault(faults: &mut VecDeque<Fault>, endpoint: &str, token: &str) -> Option<Fault> {
    let pos = faults.iter().position(|f| {
        (f.endpoint == "any" || f.endpoint.is_empty() || f.endpoint == endpoint)
            && (f.token.is_empty() || f.token == token)
    })?;
    let fault = &mut faults[pos];
    if fault.times > 1 {
        fault.times -= 1;
        Some(fault.clone())
    } else {
        faults.remove(pos)
    }
}

fn fault_reply(fault: &Fault) -> Option<Response> {
    if fault.http_status == 0 && !fault.reset {
        return None;
    }
    // A reset without a status breaks a 200 reply.
    let status = StatusCode::from_u16(fault.http_status).unwrap_or(StatusCode::OK);
    let body = if fault.reset {
        // Promise more than is sent, then fail: the connection breaks mid-body.
        let first = Bytes::from(fault.body.clone());
        let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
            Ok(first),
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "simulated reset",
            )),
        ];
        Body::from_stream(futures_util::stream::iter(chunks))
    } else {
        Body::from(fault.body.clone())
    };
    let mut reply = (status, body).into_response();
    reply.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    for (name, value) in &fault.headers {
        if let (Ok(name), Ok(value)) = (
            header::HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            reply.headers_mut().insert(name, value);
        }
    }
    Some(reply)
}

async fn create(State(sim): State<Sim>, headers: HeaderMap, body: Bytes) -> Response {
    sim.stats.create_calls.fetch_add(1, Ordering::Relaxed);
    let seen = recorded_headers(&headers);
    sim.world().last_create = Some(seen.clone());
    let token = match gate(&sim, "create", &headers).await {
        Ok(token) => token,
        Err(reply) => return reply,
    };
    let Ok(payload) = serde_json::from_slice::<Value>(&body) else {
        return reject(StatusCode::BAD_REQUEST, "Bad Request");
    };
    let prompt = payload["prompt"].as_str().unwrap_or_default();
    if prompt.is_empty() {
        return Json(json!({"status": 4001, "message": "prompt is required", "data": null}))
            .into_response();
    }
    let resolution = &payload["resolution"];
    let job = Job {
        token,
        created: Instant::now(),
        duration: jittered(sim.config.job_duration, sim.config.job_jitter),
        batch_size: resolution["batch_size"].as_i64().unwrap_or(1).clamp(1, 4),
        width: resolution["width"].as_i64().unwrap_or(1344),
        height: resolution["height"].as_i64().unwrap_or(768),
        fail: prompt.contains("[sim:fail]"),
        nsfw: prompt.contains("[sim:nsfw]"),
        prompt_id: format!("{:016x}", rand::random::<u64>()),
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    };
    let mark_id = format!("{:032x}", rand::random::<u128>());
    let mut world = sim.world();
    world.jobs.insert(mark_id.clone(), job);
    if world.creates.len() == KEEP_CREATES {
        world.creates.pop_front();
    }
    world
        .creates
        .push_back(json!({ "headers": seen, "body": payload }));
    envelope(json!({ "markId": mark_id }))
}

/// The request headers worth checking, the token reduced to its presence.
fn recorded_headers(headers: &HeaderMap) -> Value {
    let mut seen = serde_json::Map::new();
    for name in [
        "platform",
        "content-type",
        "accept",
        "user-agent",
        "origin",
        "referer",
    ] {
        seen.insert(name.to_owned(), header_text(headers, name));
    }
    seen.insert(
        "authorization".to_owned(),
        Value::Bool(headers.contains_key(header::AUTHORIZATION)),
    );
    Value::Object(seen)
}

fn header_text(headers: &HeaderMap, name: &str) -> Value {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map_or(Value::Null, |v| Value::String(v.to_owned()))
}

async fn status(State(sim): State<Sim>, headers: HeaderMap, body: Bytes) -> Response {
    sim.stats.status_calls.fetch_add(1, Ordering::Relaxed);
    sim.world().last_status = Some(recorded_headers(&headers));
    let ids = serde_json::from_slice::<Vec<String>>(&body);
    if let Ok(ids) = &ids {
        sim.stats
            .status_ids
            .fetch_add(ids.len() as u64, Ordering::Relaxed);
    }
    let token = match gate(&sim, "status", &headers).await {
        Ok(token) => token,
        Err(reply) => return reply,
    };
    let Ok(ids) = ids else {
        return reject(StatusCode::BAD_REQUEST, "Bad Request");
    };
    let host = request_host(&headers);
    let world = sim.world();
    let data: Vec<Value> = ids
        .iter()
        .filter_map(|id| {
            let job = world.jobs.get(id).filter(|j| j.token == token)?;
            Some(task(id, job, &host))
        })
        .collect();
    envelope(json!(data))
}

fn jittered(duration: Duration, jitter: f64) -> Duration {
    if jitter <= 0.0 {
        return duration;
    }
    let jitter = jitter.min(1.0);
    duration.mul_f64(1.0 + rand::random_range(-jitter..=jitter))
}

/// The authority the request was sent to, for URLs that lead back here.
fn request_host(headers: &HeaderMap) -> String {
    headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.parse::<axum::http::uri::Authority>().is_ok())
        .unwrap_or("localhost")
        .to_owned()
}

fn image_name(mark_id: &str, index: i64) -> String {
    format!("{mark_id}-{index}.png")
}

/// One entry of the status reply, with Piclumen's field names (written out
/// here rather than shared with the client, so that a wrong name on either
/// side shows up in the contract tests).
fn task(mark_id: &str, job: &Job, host: &str) -> Value {
    let elapsed = job.created.elapsed().as_secs_f64();
    let total = job.duration.as_secs_f64();
    let queued = total * 0.4;
    if elapsed < queued {
        let left = 1.0 - elapsed / queued;
        let index = (QUEUE_START as f64 * left).ceil() as i64;
        return json!({"markId": mark_id, "status": "pending", "index": index, "info": null});
    }
    let status = if elapsed < total {
        "running"
    } else if job.fail {
        "failed"
    } else {
        "success"
    };
    let mut entry = json!({"markId": mark_id, "status": status, "promptId": job.prompt_id});
    if status == "success" {
        let images: Vec<Value> = (0..job.batch_size)
            .map(|i| {
                let name = image_name(mark_id, i);
                json!({
                    "imgUrl": format!("http://{host}{IMAGES_PATH}{name}"),
                    "imgName": name,
                    "realWidth": job.width,
                    "realHeight": job.height,
                    "sensitive": if job.nsfw { json!("NSFW") } else { Value::Null },
                })
            })
            .collect();
        entry["img_urls"] = Value::Array(images);
    }
    entry
}

/// A finished job's image, as PNG.
async fn image(State(sim): State<Sim>, Path(name): Path<String>) -> Response {
    let size = {
        let world = sim.world();
        image_size(&world, &name)
    };
    let Some(size) = size else {
        return (StatusCode::NOT_FOUND, "no such image").into_response();
    };
    let cached = sim.images().get(&size).cloned();
    let png = match cached {
        Some(png) => png,
        None => {
            // Encoding takes a while for big images: off the async threads.
            let Ok(Ok(png)) = tokio::task::spawn_blocking(move || gradient_png(size)).await else {
                return (StatusCode::INTERNAL_SERVER_ERROR, "cannot draw the image")
                    .into_response();
            };
            let mut images = sim.images();
            if images.len() >= KEEP_IMAGE_SIZES {
                images.clear();
            }
            images.insert(size, png.clone());
            png
        }
    };
    ([(header::CONTENT_TYPE, "image/png")], png).into_response()
}

/// The size of the image `name` (`<markId>-<i>.png`), when that job has
/// finished with at least `i + 1` images.
fn image_size(world: &World, name: &str) -> Option<(u32, u32)> {
    let (mark_id, index) = name.strip_suffix(".png")?.rsplit_once('-')?;
    let index: i64 = index.parse().ok()?;
    let job = world.jobs.get(mark_id)?;
    let done = job.created.elapsed() >= job.duration && !job.fail;
    if !done || !(0..job.batch_size).contains(&index) {
        return None;
    }
    let side = |v: i64| u32::try_from(v.clamp(1, MAX_IMAGE_SIDE)).ok();
    Some((side(job.width)?, side(job.height)?))
}

/// A left-to-right gradient: every row alike, so it compresses to little.
fn gradient_png((width, height): (u32, u32)) -> Result<Bytes, png::EncodingError> {
    let row: Vec<u8> = (0..width)
        .flat_map(|x| {
            let t = u8::try_from(u64::from(x) * 255 / u64::from(width.max(2) - 1)).unwrap_or(255);
            [t, 96, 255 - t]
        })
        .collect();
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Balanced);
    encoder.set_filter(png::Filter::Up);
    let mut writer = encoder.write_header()?;
    {
        let mut stream = writer.stream_writer()?;
        for _ in 0..height {
            std::io::Write::write_all(&mut stream, &row)?;
        }
        stream.finish()?;
    }
    writer.finish()?;
    Ok(Bytes::from(out))
}

async fn stats(State(sim): State<Sim>) -> Json<Value> {
    let s = &sim.stats;
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let (jobs, faults_queued) = {
        let world = sim.world();
        let queued: u64 = world.faults.iter().map(|f| u64::from(f.times.max(1))).sum();
        (world.jobs.len(), queued)
    };
    Json(json!({
        "create_calls": load(&s.create_calls),
        "status_calls": load(&s.status_calls),
        "status_ids": load(&s.status_ids),
        "injected_5xx": load(&s.injected_5xx),
        "injected_429": load(&s.injected_429),
        "scripted_faults": load(&s.scripted_faults),
        "faults_queued": faults_queued,
        "unauthorized": load(&s.unauthorized),
        "jobs": jobs,
    }))
}

async fn add_faults(State(sim): State<Sim>, body: Bytes) -> Response {
    let faults = match serde_json::from_slice::<Vec<Fault>>(&body) {
        Ok(faults) => faults,
        Err(e) => {
            let message = format!("invalid fault script: {e}");
            return (StatusCode::BAD_REQUEST, message).into_response();
        }
    };
    for (i, fault) in faults.iter().enumerate() {
        if let Err(why) = fault.check() {
            let message = format!("invalid fault script: fault {i}: {why}");
            return (StatusCode::BAD_REQUEST, message).into_response();
        }
    }
    sim.world().faults.extend(faults);
    StatusCode::NO_CONTENT.into_response()
}

impl Fault {
    /// Refuses faults that cannot match or would change nothing.
    fn check(&self) -> Result<(), String> {
        if !["", "any", "create", "status"].contains(&self.endpoint.as_str()) {
            return Err(format!(
                "unknown endpoint `{}`, expected `create`, `status` or `any`",
                self.endpoint
            ));
        }
        if self.http_status != 0 && !(100..=599).contains(&self.http_status) {
            return Err(format!(
                "http_status {} is not an HTTP status",
                self.http_status
            ));
        }
        if self.http_status == 0 && self.delay_ms == 0 && !self.reset {
            return Err("changes nothing: set http_status, delay_ms or reset".into());
        }
        Ok(())
    }
}

/// Every job's creation time (Unix milliseconds) and duration, by mark id:
/// lets a benchmark tell when the simulator changed a job's state (running
/// at 40% of the duration, finished at 100%).
async fn jobs(State(sim): State<Sim>) -> Json<Value> {
    let world = sim.world();
    Json(Value::Object(
        world
            .jobs
            .iter()
            .map(|(id, job)| {
                let times = json!({
                    "created_unix_ms": job.created_unix_ms,
                    "duration_ms": job.duration.as_millis(),
                });
                (id.clone(), times)
            })
            .collect(),
    ))
}

async fn requests(State(sim): State<Sim>) -> Json<Value> {
    let world = sim.world();
    Json(json!({ "create": world.last_create, "status": world.last_status }))
}

async fn creates(State(sim): State<Sim>) -> Json<Value> {
    Json(Value::Array(sim.world().creates.iter().cloned().collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A simulator on a loopback port of its own, stopped when dropped.
    struct Running {
        url: String,
        http: reqwest::Client,
        _stop: tokio::sync::oneshot::Sender<()>,
    }

    async fn start(config: SimConfig) -> Running {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(listener, config, async {
            let _ = stopped.await;
        }));
        Running {
            url,
            http: reqwest::Client::new(),
            _stop: stop,
        }
    }

    impl Running {
        async fn post(&self, path: &str, body: Value) -> reqwest::Response {
            self.http
                .post(format!("{}{path}", self.url))
                .header(header::AUTHORIZATION, "t")
                .header(header::CONTENT_TYPE, "application/json")
                .body(body.to_string())
                .send()
                .await
                .expect("post")
        }

        async fn json(&self, response: reqwest::Response) -> Value {
            let bytes = response.bytes().await.expect("body");
            serde_json::from_slice(&bytes).expect("json")
        }

        async fn create(&self, body: Value) -> String {
            let reply = self.post(CREATE_PATH, body).await;
            let reply = self.json(reply).await;
            reply["data"]["markId"].as_str().expect("markId").to_owned()
        }

        /// The job's status entry, polled until `state` (bounded).
        async fn wait_for(&self, mark_id: &str, state: &str) -> Value {
            for _ in 0..500 {
                let reply = self.post(STATUS_PATH, json!([mark_id])).await;
                let entry = self.json(reply).await["data"][0].clone();
                if entry["status"] == state {
                    return entry;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("{mark_id} never reached {state}");
        }
    }

    fn quick() -> SimConfig {
        SimConfig {
            job_duration: Duration::from_millis(200),
            ..SimConfig::default()
        }
    }

    fn decode_png(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes.to_vec()));
        let mut reader = decoder.read_info().expect("png header");
        let mut pixels = vec![0; reader.output_buffer_size().expect("size")];
        let frame = reader.next_frame(&mut pixels).expect("png frame");
        pixels.truncate(frame.buffer_size());
        (frame.width, frame.height, pixels)
    }

    #[tokio::test]
    async fn image_urls_lead_back_to_real_pngs_of_the_job_size() {
        let sim = start(quick()).await;
        let mark_id = sim
            .create(json!({
                "prompt": "p",
                "resolution": {"width": 640, "height": 320, "batch_size": 2},
            }))
            .await;
        let early = sim
            .http
            .get(format!("{}{IMAGES_PATH}{mark_id}-0.png", sim.url))
            .send()
            .await
            .expect("get");
        assert_eq!(early.status(), StatusCode::NOT_FOUND, "not before success");

        let entry = sim.wait_for(&mark_id, "success").await;
        let images = entry["img_urls"].as_array().expect("img_urls");
        assert_eq!(images.len(), 2);
        for (i, image) in images.iter().enumerate() {
            let name = format!("{mark_id}-{i}.png");
            assert_eq!(image["imgName"], name.as_str());
            assert_eq!(
                image["imgUrl"],
                format!("{}{IMAGES_PATH}{name}", sim.url).as_str()
            );
            let url = image["imgUrl"].as_str().expect("url");
            let reply = sim.http.get(url).send().await.expect("get image");
            assert_eq!(reply.status(), StatusCode::OK);
            assert_eq!(reply.headers()[header::CONTENT_TYPE], "image/png");
            let length: usize = reply.headers()[header::CONTENT_LENGTH]
                .to_str()
                .expect("ascii")
                .parse()
                .expect("number");
            let bytes = reply.bytes().await.expect("image body");
            assert_eq!(bytes.len(), length);
            let (width, height, pixels) = decode_png(&bytes);
            assert_eq!((width, height), (640, 320));
            assert_eq!(pixels.len(), 640 * 320 * 3, "RGB, 8 bits");
            assert!(bytes.len() < 16 * 1024, "small: {} bytes", bytes.len());
        }
    }

    #[tokio::test]
    async fn unknown_or_unfinished_image_names_get_404() {
        let sim = start(quick()).await;
        let done = sim.create(json!({"prompt": "p"})).await;
        let failed = sim.create(json!({"prompt": "p [sim:fail]"})).await;
        sim.wait_for(&done, "success").await;
        sim.wait_for(&failed, "failed").await;
        let ok = format!("{done}-0.png");
        for name in [
            ok.as_str(),
            &format!("{done}-1.png"),
            &format!("{done}--1.png"),
            &format!("{done}-0.webp"),
            &format!("{failed}-0.png"),
            "nope-0.png",
            "nothing",
        ] {
            let reply = sim
                .http
                .get(format!("{}{IMAGES_PATH}{name}", sim.url))
                .send()
                .await
                .expect("get");
            let expected = if name == ok {
                StatusCode::OK
            } else {
                StatusCode::NOT_FOUND
            };
            assert_eq!(reply.status(), expected, "{name}");
        }
    }

    #[test]
    fn gradient_png_of_the_default_size_is_small_and_decodes() {
        let bytes = gradient_png((1344, 768)).expect("encode");
        let (width, height, pixels) = decode_png(&bytes);
        assert_eq!((width, height), (1344, 768));
        assert_eq!(&pixels[..3], &[0, 96, 255], "gradient starts blue");
        assert_eq!(&pixels[1343 * 3..1344 * 3], &[255, 96, 0], "ends red");
        assert!(bytes.len() < 16 * 1024, "{} bytes", bytes.len());
    }
}
