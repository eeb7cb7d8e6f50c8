//! The Piclumen simulator: both upstream endpoints with Piclumen's JSON
//! shapes and behaviour, plus knobs and counters for tests and benchmarks.
//!
//! Jobs belong to the token that created them; each goes `pending` (queue
//! index falling) for the first 40% of `job_duration`, then `running`, then
//! `success` with `batch_size` images (or `failed` for prompts containing
//! `[sim:fail]`). A finished job is forgotten some minutes after it
//! finished (see `world`). `GET /_sim/stats` counts every request, injected
//! faults included, the failed replies of each endpoint (`create_failed`,
//! `status_failed`: a fault's reply or a refusal, anything but the normal
//! answer) and the TCP connections accepted; `POST /_sim/faults` scripts
//! the next replies, for a number of requests or for a time; `GET
//! /_sim/creates` shows the accepted creates, each as `{"headers", "body"}`;
//! `GET /_sim/requests` shows the headers of the latest request to each
//! endpoint, as `{"create": headers, "status": headers}` (`null` before the
//! first), whatever its reply; `GET /_sim/jobs` gives each job's creation
//! time and duration, the SHA-256 of its token and its image count.
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
//!
//! The simulator writes Piclumen's contract out on its own, with
//! `serde_json::json!`, and shares no wire type with the client: a wrong
//! field name on either side then shows up in the contract tests.
//!
//! # Layout
//!
//! - `mod.rs`: knobs, routes, and the two Piclumen endpoints (an HTTP shell).
//! - `world`: the jobs, their states and the call counters; decides on `now`.
//! - `faults`: latency, scripted faults (`POST /_sim/faults`), random 5xx/429.
//! - `images`: the PNGs that finished jobs' image URLs lead to.
//! - `inspect`: the `/_sim/...` read-outs for tests and benchmarks.

mod faults;
mod images;
mod inspect;
#[cfg(test)]
mod tests;
mod world;

use crate::support::lock;
use std::{
    future::Future,
    sync::{Arc, Mutex, MutexGuard, atomic::AtomicU64},
    time::Duration,
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
    serve::ListenerExt,
};
use serde_json::{Value, json};
use tokio::{net::TcpListener, time::Instant};

use crate::flags::{duration_or_zero, human, no_flags, positive_duration, rate};

pub use faults::Fault;

use faults::Faults;
use world::{Calls, Job, World};

/// Simulator knobs; each but `tokens` is a `sim` flag, declared here.
#[derive(Debug, Clone, clap::Args)]
pub struct SimConfig {
    /// Time from create to a finished job (40% queued, then running).
    #[arg(long, env = "PICLUMEN_SIM_JOB_DURATION", default_value = human(defaults::SIM_JOB_DURATION), value_parser = positive_duration)]
    pub job_duration: Duration,
    /// Each job's duration varies randomly by up to this fraction (0 to 1).
    #[arg(long, env = "PICLUMEN_SIM_JOB_JITTER", default_value = "0", value_parser = rate)]
    pub job_jitter: f64,
    /// Delay added to every API reply.
    #[arg(long, env = "PICLUMEN_SIM_LATENCY", default_value = "0s", value_parser = duration_or_zero)]
    pub latency: Duration,
    /// Share (0 to 1) of API requests answered with a random 5xx.
    #[arg(long, env = "PICLUMEN_SIM_FAIL_5XX_RATE", default_value = "0", value_parser = rate)]
    pub fail_5xx_rate: f64,
    /// Share (0 to 1) of API requests answered 429 with `Retry-After: 1`.
    #[arg(long, env = "PICLUMEN_SIM_FAIL_429_RATE", default_value = "0", value_parser = rate)]
    pub fail_429_rate: f64,
    /// Accepted tokens; empty accepts any non-empty token (from `--tokens`,
    /// checked by `config`).
    #[arg(skip)]
    pub tokens: Vec<crate::job::Token>,
}

impl Default for SimConfig {
    fn default() -> Self {
        no_flags()
    }
}

/// The simulator's defaults that are not on [`SimConfig`]'s fields.
pub mod defaults {
    use std::time::Duration;

    /// `sim --job-duration` and `serve --sim-job-duration`: the one default
    /// two flags share.
    pub const SIM_JOB_DURATION: Duration = Duration::from_secs(6);
    /// Default token of `serve --simulate` when none is given, so the quick
    /// start works without one. The simulator accepts any token.
    pub const SIMULATOR_TOKEN: &str = "simulator-demo-token";
}

/// Piclumen's create path.
const CREATE_PATH: &str = "/api/gen/create";
/// Piclumen's batch status path.
const STATUS_PATH: &str = "/api/task/batch-process-task";

/// What every handler shares.
#[derive(Debug, Clone)]
struct Sim {
    config: Arc<SimConfig>,
    calls: Arc<Calls>,
    world: Arc<Mutex<World>>,
    faults: Arc<Faults>,
    images: Arc<images::Cache>,
}

impl Sim {
    fn world(&self) -> MutexGuard<'_, World> {
        lock(&self.world)
    }
}

/// The simulator's HTTP routes.
pub fn router(config: SimConfig) -> Router {
    routes(config, Arc::default())
}

fn routes(config: SimConfig, calls: Arc<Calls>) -> Router {
    let sim = Sim {
        faults: Arc::new(Faults::new(&config)),
        config: Arc::new(config),
        calls,
        world: Arc::default(),
        images: Arc::default(),
    };
    Router::new()
        .route(CREATE_PATH, post(create))
        .route(STATUS_PATH, post(status))
        .route("/_sim/stats", get(inspect::stats))
        // A scripted reply may be large (a test of the client's reply limit).
        .route(
            "/_sim/faults",
            post(faults::add).layer(axum::extract::DefaultBodyLimit::max(16 << 20)),
        )
        .route("/_sim/creates", get(inspect::creates))
        .route("/_sim/requests", get(inspect::requests))
        .route("/_sim/jobs", get(inspect::jobs))
        .route("/_sim/images/{name}", get(images::image))
        .with_state(sim)
}

/// Serves the simulator on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    config: SimConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let calls = Arc::<Calls>::default();
    let accepted = Arc::clone(&calls);
    let listener = listener.tap_io(move |tcp| {
        Calls::count(&accepted.connections, 1);
        // Without TCP_NODELAY small replies can wait on delayed ACKs (~40 ms).
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, routes(config, calls))
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

/// Faults (latency, scripted, random), then the token check, in the order
/// a request meets them; `Err` is the reply to send instead.
async fn gate(sim: &Sim, endpoint: &str, headers: &HeaderMap) -> Result<String, Response> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    if let Some(reply) = sim.faults.meet(endpoint, &token, &sim.calls).await {
        return Err(reply);
    }
    let allowed = !token.is_empty()
        && (sim.config.tokens.is_empty() || sim.config.tokens.iter().any(|t| t.expose() == token));
    if !allowed {
        Calls::count(&sim.calls.unauthorized, 1);
        return Err(reject(StatusCode::UNAUTHORIZED, "Unauthorized"));
    }
    Ok(token)
}

/// The reply of a handler whose `Err` is a failed reply (a fault's, a
/// refusal), counted in `failed`.
fn counted(reply: Result<Response, Response>, failed: &AtomicU64) -> Response {
    reply.unwrap_or_else(|reply| {
        Calls::count(failed, 1);
        reply
    })
}

async fn create(State(sim): State<Sim>, headers: HeaderMap, body: Bytes) -> Response {
    Calls::count(&sim.calls.create_calls, 1);
    counted(
        create_reply(&sim, &headers, &body).await,
        &sim.calls.create_failed,
    )
}

async fn create_reply(sim: &Sim, headers: &HeaderMap, body: &Bytes) -> Result<Response, Response> {
    let seen = recorded_headers(headers);
    sim.world().last_create = Some(seen.clone());
    let token = gate(sim, "create", headers).await?;
    let Ok(payload) = serde_json::from_slice::<Value>(body) else {
        return Err(reject(StatusCode::BAD_REQUEST, "Bad Request"));
    };
    let now = Instant::now();
    let duration = jittered(sim.config.job_duration, sim.config.job_jitter);
    let Some(job) = Job::ordered(token, &payload, now, duration) else {
        return Err(
            Json(json!({"status": 4001, "message": "prompt is required", "data": null}))
                .into_response(),
        );
    };
    let mark_id = format!("{:032x}", rand::random::<u128>());
    let mut world = sim.world();
    world.insert(now, mark_id.clone(), job);
    world.record_create(json!({ "headers": seen, "body": payload }));
    Ok(envelope(json!({ "markId": mark_id })))
}

async fn status(State(sim): State<Sim>, headers: HeaderMap, body: Bytes) -> Response {
    Calls::count(&sim.calls.status_calls, 1);
    counted(
        status_reply(&sim, &headers, &body).await,
        &sim.calls.status_failed,
    )
}

async fn status_reply(sim: &Sim, headers: &HeaderMap, body: &Bytes) -> Result<Response, Response> {
    sim.world().last_status = Some(recorded_headers(headers));
    let ids = serde_json::from_slice::<Vec<String>>(body);
    if let Ok(ids) = &ids {
        Calls::count(&sim.calls.status_ids, ids.len());
    }
    let token = gate(sim, "status", headers).await?;
    let Ok(ids) = ids else {
        return Err(reject(StatusCode::BAD_REQUEST, "Bad Request"));
    };
    let host = request_host(headers);
    let data = sim.world().status(Instant::now(), &token, &ids, &host);
    Ok(envelope(Value::Array(data)))
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
        let text = headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map_or(Value::Null, |v| Value::String(v.to_owned()));
        seen.insert(name.to_owned(), text);
    }
    seen.insert(
        "authorization".to_owned(),
        Value::Bool(headers.contains_key(header::AUTHORIZATION)),
    );
    Value::Object(seen)
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
