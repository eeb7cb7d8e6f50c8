//! The read-outs tests and benchmarks inspect the simulator through:
//! `GET /_sim/stats`, `/_sim/creates`, `/_sim/requests` and `/_sim/jobs`.

use axum::{Json, extract::State};
use serde_json::{Value, json};

use super::{Calls, Sim};

/// `GET /_sim/stats`: the request counters, the failed replies of each
/// endpoint, the requests scripted faults will still meet, the timed
/// faults in force and how many jobs there are.
pub(super) async fn stats(State(sim): State<Sim>) -> Json<Value> {
    let c = &sim.calls;
    let jobs = sim.world().len();
    Json(json!({
        "create_calls": Calls::read(&c.create_calls),
        "status_calls": Calls::read(&c.status_calls),
        "status_ids": Calls::read(&c.status_ids),
        "create_failed": Calls::read(&c.create_failed),
        "status_failed": Calls::read(&c.status_failed),
        "injected_5xx": Calls::read(&c.injected_5xx),
        "injected_429": Calls::read(&c.injected_429),
        "scripted_faults": Calls::read(&c.scripted_faults),
        "faults_queued": sim.faults.queued(),
        "faults_timed": sim.faults.timed(),
        "unauthorized": Calls::read(&c.unauthorized),
        "connections": Calls::read(&c.connections),
        "jobs": jobs,
    }))
}

/// `GET /_sim/jobs`: every job's creation time (Unix milliseconds) and
/// duration, by mark id: lets a benchmark tell when the simulator changed a
/// job's state (running at 40% of the duration, finished at 100%).
pub(super) async fn jobs(State(sim): State<Sim>) -> Json<Value> {
    let world = sim.world();
    Json(Value::Object(
        world
            .jobs()
            .map(|(id, job)| {
                let times = json!({
                    "created_unix_ms": job.created_unix_ms,
                    "duration_ms": job.duration.as_millis(),
                    // Which account paid, without the token: counts per
                    // account across a fleet's replicas.
                    "token_sha256": job.token_sha256(),
                    "images": job.batch_size(),
                });
                (id.clone(), times)
            })
            .collect(),
    ))
}

/// `GET /_sim/requests`: the headers of the latest create and status
/// requests.
pub(super) async fn requests(State(sim): State<Sim>) -> Json<Value> {
    let world = sim.world();
    Json(json!({ "create": world.last_create, "status": world.last_status }))
}

/// `GET /_sim/creates`: the latest accepted creates, oldest first.
pub(super) async fn creates(State(sim): State<Sim>) -> Json<Value> {
    Json(Value::Array(sim.world().creates().cloned().collect()))
}
