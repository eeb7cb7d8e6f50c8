//! The Piclumen simulator: both upstream endpoints with Piclumen's JSON
//! shapes and behaviour, plus knobs and counters for tests and benchmarks.
//!
//! Jobs belong to the token that created them; each goes `pending` (queue
//! index falling) for the first 40% of `job_duration`, then `running`, then
//! `success` with `batch_size` images (or `failed` for prompts containing
//! `[sim:fail]`). `GET /_sim/stats` counts every request, injected faults
//! included; `POST /_sim/faults` scripts the next replies; `GET
//! /_sim/creates` shows the create bodies received; `GET /_sim/jobs` gives
//! each job's creation time and duration.

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
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
    serve::ListenerExt,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::{net::TcpListener, time::Instant};

use crate::upstream::{CREATE_PATH, ImageWire, STATUS_PATH, TaskWire};

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
        use crate::config::defaults;
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

/// How many recent create bodies `/_sim/creates` keeps.
const KEEP_CREATES: usize = 200;
/// Queue index of a new job.
const QUEUE_START: i64 = 3;

/// A scripted reply, consumed by the next matching request(s).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
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
}

#[derive(Debug, Clone)]
struct Sim {
    config: Arc<SimConfig>,
    stats: Arc<Stats>,
    world: Arc<Mutex<World>>,
}

impl Sim {
    fn world(&self) -> MutexGuard<'_, World> {
        self.world
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
    };
    Router::new()
        .route(CREATE_PATH, post(create))
        .route(STATUS_PATH, post(status))
        .route("/_sim/stats", get(stats))
        .route("/_sim/faults", post(add_faults))
        .route("/_sim/creates", get(creates))
        .route("/_sim/jobs", get(jobs))
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
    world.creates.push_back(json!({
        "headers": {
            "platform": header_text(&headers, "platform"),
            "content-type": header_text(&headers, "content-type"),
            "accept": header_text(&headers, "accept"),
        },
        "body": payload,
    }));
    envelope(json!({ "markId": mark_id }))
}

fn header_text(headers: &HeaderMap, name: &str) -> Value {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map_or(Value::Null, |v| Value::String(v.to_owned()))
}

async fn status(State(sim): State<Sim>, headers: HeaderMap, body: Bytes) -> Response {
    sim.stats.status_calls.fetch_add(1, Ordering::Relaxed);
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
    let world = sim.world();
    let data: Vec<TaskWire> = ids
        .iter()
        .filter_map(|id| {
            let job = world.jobs.get(id).filter(|j| j.token == token)?;
            Some(task(id, job))
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

fn task(mark_id: &str, job: &Job) -> TaskWire {
    let elapsed = job.created.elapsed().as_secs_f64();
    let total = job.duration.as_secs_f64();
    let queued = total * 0.4;
    let mut wire = TaskWire {
        mark_id: mark_id.to_owned(),
        status: String::new(),
        index: None,
        prompt_id: None,
        img_urls: None,
        info: None,
    };
    if elapsed < queued {
        let left = 1.0 - elapsed / queued;
        wire.status = "pending".into();
        wire.index = Some((QUEUE_START as f64 * left).ceil() as i64);
    } else if elapsed < total {
        wire.status = "running".into();
        wire.prompt_id = Some(job.prompt_id.clone());
    } else if job.fail {
        wire.status = "failed".into();
        wire.prompt_id = Some(job.prompt_id.clone());
    } else {
        wire.status = "success".into();
        wire.prompt_id = Some(job.prompt_id.clone());
        wire.img_urls = Some(
            (0..job.batch_size)
                .map(|i| {
                    let name = format!("{mark_id}-{i}.webp");
                    ImageWire {
                        img_url: Some(format!("https://images.piclumen-sim.invalid/{name}")),
                        img_name: Some(name),
                        real_width: Some(job.width),
                        real_height: Some(job.height),
                        sensitive: job.nsfw.then(|| "NSFW".to_owned()),
                    }
                })
                .collect(),
        );
    }
    wire
}

async fn stats(State(sim): State<Sim>) -> Json<Value> {
    let s = &sim.stats;
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let jobs = sim.world().jobs.len();
    Json(json!({
        "create_calls": load(&s.create_calls),
        "status_calls": load(&s.status_calls),
        "status_ids": load(&s.status_ids),
        "injected_5xx": load(&s.injected_5xx),
        "injected_429": load(&s.injected_429),
        "scripted_faults": load(&s.scripted_faults),
        "unauthorized": load(&s.unauthorized),
        "jobs": jobs,
    }))
}

async fn add_faults(State(sim): State<Sim>, Json(faults): Json<Vec<Fault>>) -> StatusCode {
    sim.world().faults.extend(faults);
    StatusCode::NO_CONTENT
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

async fn creates(State(sim): State<Sim>) -> Json<Value> {
    Json(Value::Array(sim.world().creates.iter().cloned().collect()))
}
