//! Upstream faults as WatchImage meets them: transient trouble is ridden
//! out, anything else ends the watch with the same code a unary call gets;
//! plus chaos (20% random 5xx/429) and protocol edge cases.

mod common;

use std::time::Duration;

use common::*;
use piclumen_grpc::pb::{self, JobState};
use serde_json::{Value, json};
use tonic::Code;

enum Outcome {
    /// The watch recovers and ends OK with SUCCEEDED.
    Recovers,
    /// The watch ends with this code and reason.
    Ends(Code, &'static str),
}

fn watch_cases() -> Vec<(&'static str, Value, Outcome)> {
    use Outcome::*;
    let body = |b: &str| json!({"http_status": 200, "body": b});
    // Twice a server error, then the real reply.
    let twice = |status: u16| json!({"http_status": status, "body": "x", "times": 2});
    vec![
        (
            "400",
            json!({"http_status": 400, "body": "bad"}),
            Ends(Code::InvalidArgument, "UPSTREAM_BAD_REQUEST"),
        ),
        (
            "401",
            json!({"http_status": 401, "body": "{}"}),
            Ends(Code::Unauthenticated, "TOKEN_REJECTED"),
        ),
        (
            "403",
            json!({"http_status": 403, "body": "{}"}),
            Ends(Code::PermissionDenied, "PERMISSION_DENIED"),
        ),
        (
            "404",
            json!({"http_status": 404, "body": "gone"}),
            Ends(Code::Internal, "UPSTREAM_HTTP_ERROR"),
        ),
        (
            "429 Retry-After",
            json!({"http_status": 429, "body": "{}", "headers": {"Retry-After": "1"}, "times": 2}),
            Recovers,
        ),
        (
            "429 bare",
            json!({"http_status": 429, "body": "{}", "times": 2}),
            Recovers,
        ),
        ("500", twice(500), Recovers),
        ("502", twice(502), Recovers),
        ("503", twice(503), Recovers),
        ("504", twice(504), Recovers),
        (
            "reset mid-body",
            json!({"reset": true, "http_status": 200, "body": "{\"st", "times": 2}),
            Recovers,
        ),
        (
            "slower than the upstream timeout",
            json!({"delay_ms": 1500}),
            Recovers,
        ),
        (
            "non-JSON",
            body("<html>oops</html>"),
            Ends(Code::Internal, "UPSTREAM_BAD_REPLY"),
        ),
        (
            "wrong shape",
            body("{\"status\":0,\"data\":{\"markId\":1}}"),
            Ends(Code::Internal, "UPSTREAM_BAD_REPLY"),
        ),
        (
            "envelope status",
            body("{\"status\":500,\"message\":\"maintenance\"}"),
            Ends(Code::FailedPrecondition, "UPSTREAM_REJECTED"),
        ),
        (
            "empty data",
            body("{\"status\":0,\"data\":[]}"),
            Ends(Code::NotFound, "JOB_NOT_FOUND"),
        ),
        (
            "null data",
            body("{\"status\":0,\"data\":null}"),
            Ends(Code::NotFound, "JOB_NOT_FOUND"),
        ),
        (
            "id missing",
            body("{\"status\":0,\"data\":[{\"markId\":\"other\",\"status\":\"running\"}]}"),
            Ends(Code::NotFound, "JOB_NOT_FOUND"),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_meets_each_upstream_fault() {
    let h = Harness::with_upstream_timeout(Duration::from_millis(500)).await;
    let sim = &h.sim;
    let mut client = h.client().await;
    for (name, fault, outcome) in watch_cases() {
        let mark_id = start_job(&mut client, TOKEN, name).await;
        let mut fault = fault;
        fault["endpoint"] = json!("status");
        let times = fault["times"].as_u64().unwrap_or(1);
        let fired_before = sim.stat("scripted_faults").await;
        sim.script(json!([fault])).await;
        let (messages, end) = collect_watch(&mut client, TOKEN, &mark_id).await;
        // Each case meets its fault as often as scripted, and only that.
        let fired = sim.stat("scripted_faults").await - fired_before;
        assert_eq!(
            fired, times,
            "{name}: the fault fired {fired} of {times} times"
        );
        assert_eq!(sim.stat("faults_queued").await, 0, "{name}: left unused");
        match outcome {
            Outcome::Recovers => {
                end.unwrap_or_else(|s| panic!("{name}: the watch should recover, got {s:?}"));
                assert_eq!(
                    states(&messages).last(),
                    Some(&JobState::Succeeded),
                    "{name}"
                );
            }
            Outcome::Ends(code, reason) => {
                let status = end.expect_err(name);
                assert_eq!(status.code(), code, "{name}: {status:?}");
                assert_status(&status, code, reason);
            }
        }
    }
}

#[tokio::test]
async fn success_without_images_and_unknown_states_pass_through() {
    let h = Harness::start().await;
    let mut client = h.client().await;
    let mark_id = start_job(&mut client, TOKEN, "p").await;
    let entry = |status: &str| {
        format!(
            "{{\"status\":0,\"data\":[{{\"markId\":\"{mark_id}\",\"status\":\"{status}\",\"img_urls\":[]}}]}}"
        )
    };
    h.sim
        .script(json!([
            {"endpoint": "status", "http_status": 200, "body": entry("upscaling")},
            {"endpoint": "status", "http_status": 200, "body": entry("success"), "times": 100}
        ]))
        .await;
    let (messages, end) = collect_watch(&mut client, TOKEN, &mark_id).await;
    end.expect("ends OK");
    // Both scripted replies were met: the first once, the second at least once.
    let fired = h.sim.stat("scripted_faults").await;
    assert!(fired >= 2, "fired {fired}");
    assert_eq!(fired + h.sim.stat("faults_queued").await, 101);
    let jobs: Vec<pb::ImageJob> = messages.into_iter().filter_map(|m| m.job).collect();
    assert_eq!(jobs[0].state(), JobState::Unspecified);
    assert_eq!(
        jobs[0].upstream_status, "upscaling",
        "the unknown state is shown, not hidden"
    );
    let last = jobs.last().expect("terminal");
    assert_eq!(last.state(), JobState::Succeeded);
    assert!(
        last.images.is_empty(),
        "an empty image list is reported as such"
    );
    let checked = client
        .check_image(authed(TOKEN, check_request(mark_id.clone())))
        .await
        .expect("check")
        .into_inner()
        .job
        .expect("job");
    assert_eq!(checked.state(), JobState::Succeeded);
    assert!(checked.images.is_empty());
}

#[tokio::test]
async fn watch_against_a_refused_upstream_ends_unavailable_after_the_budget() {
    let mut config = server_config();
    config.hub.failure_budget = Duration::from_millis(600);
    let server = Server::start(config, format!("http://{}", unused_addr())).await;
    let mut client = server.client().await;
    let (_, end) = collect_watch(&mut client, TOKEN, "m").await;
    let status = end.expect_err("refused");
    assert_status(&status, Code::Unavailable, "UPSTREAM_UNAVAILABLE");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_watches_finish_under_twenty_percent_faults() {
    let mut sim = sim_config();
    sim.job_duration = Duration::from_millis(1500);
    sim.fail_5xx_rate = 0.1;
    sim.fail_429_rate = 0.1;
    let mut config = server_config();
    config.hub.failure_budget = Duration::from_secs(30);
    config.service.max_generates_per_token = 1_000;
    let h = Harness::with(sim, config).await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(h.client().await);
    }
    let tasks: Vec<_> = (0..500)
        .map(|i| {
            let mut client = clients[i % clients.len()].clone();
            tokio::spawn(async move {
                // Callers retry GenerateImage with a request_id, so a retry
                // never starts a second job; after a gateway error (502/504)
                // the outcome is unknown and the caller decides to create
                // again with a new request_id (the simulator's injected
                // faults create nothing).
                let mut request = pb::GenerateImageRequest {
                    request_id: format!("chaos-{i}"),
                    ..generate("chaos")
                };
                let mut mark_id = None;
                for n in 0..50 {
                    match client.generate_image(authed(TOKEN, request.clone())).await {
                        Ok(r) => {
                            mark_id = Some(r.into_inner().mark_id);
                            break;
                        }
                        Err(s) if s.code() == Code::Aborted => {
                            assert_status(&s, Code::Aborted, "CREATE_OUTCOME_UNKNOWN");
                            request.request_id = format!("chaos-{i}-{n}");
                        }
                        Err(s) => {
                            assert!(
                                matches!(s.code(), Code::Unavailable | Code::ResourceExhausted),
                                "{s:?}"
                            );
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
                let mark_id = mark_id.expect("created within 50 tries");
                collect_watch(&mut client, TOKEN, &mark_id).await
            })
        })
        .collect();
    for task in tasks {
        let (messages, end) = task.await.expect("join");
        end.expect("every watch ends OK");
        let states = states(&messages);
        let terminal = states
            .iter()
            .filter(|s| matches!(s, JobState::Succeeded | JobState::Failed))
            .count();
        assert_eq!(terminal, 1, "exactly one terminal message: {states:?}");
        assert_eq!(states.last(), Some(&JobState::Succeeded));
        for pair in messages.windows(2) {
            assert_ne!(pair[0].job, pair[1].job, "no update reported twice");
        }
    }
    let stats = h.sim.stats().await;
    assert!(
        stats["injected_5xx"].as_u64().expect("n") > 0
            && stats["injected_429"].as_u64().expect("n") > 0
    );
    assert_eq!(stats["jobs"], 500, "retried creates made no extra jobs");
}

#[tokio::test]
async fn unknown_methods_are_unimplemented() {
    let h = Harness::start().await;
    for path in [
        "/piclumen.v1.ImageService/DeleteImage",
        "/no.such.Service/Call",
    ] {
        let mut grpc = tonic::client::Grpc::new(h.server.channel().await);
        grpc.ready().await.expect("ready");
        let status = grpc
            .unary(
                tonic::Request::new(()),
                path.parse().expect("path"),
                tonic_prost::ProstCodec::<(), ()>::default(),
            )
            .await
            .expect_err("unknown method");
        assert_eq!(status.code(), Code::Unimplemented, "{path}: {status:?}");
    }
}

#[tokio::test]
async fn messages_with_non_ascii_and_control_characters_arrive_intact() {
    let h = Harness::start().await;
    let mut client = h.client().await;
    let id = "été\u{7}☀\tжук";
    let status = client
        .check_image(authed(TOKEN, check_request(id)))
        .await
        .expect_err("control characters");
    assert_status(&status, Code::InvalidArgument, "INVALID_REQUEST");
    assert_eq!(
        status.message(),
        format!("mark_id: contains control characters: {id}")
    );
}

#[tokio::test]
async fn fault_scripts_with_a_misspelled_key_or_no_effect_are_refused() {
    let sim = Sim::start(sim_config()).await;
    let cases = [
        (
            json!([{"endpoint": "status", "http_stauts": 500}]),
            "unknown field `http_stauts`",
        ),
        (
            json!([{"endpoint": "status", "http_status": 500, "tims": 2}]),
            "unknown field `tims`",
        ),
        (
            json!([{"endpoint": "statuss", "http_status": 500}]),
            "fault 0: unknown endpoint `statuss`",
        ),
        (
            json!([{"endpoint": "create", "http_status": 500}, {"endpoint": "status"}]),
            "fault 1: changes nothing",
        ),
        (
            json!([{"endpoint": "status", "http_status": 1000}]),
            "http_status 1000 is not an HTTP status",
        ),
    ];
    for (script, named) in cases {
        let (status, body) = sim.post_faults(&script).await;
        assert_eq!(status, 400, "{script}: {body}");
        assert!(body.contains(named), "{script}: {body}");
    }
    assert_eq!(
        sim.stat("faults_queued").await,
        0,
        "a refused script queues none of its faults"
    );
    // Omitted keys still take their defaults.
    sim.script(json!([{"http_status": 503}])).await;
    assert_eq!(sim.stat("faults_queued").await, 1);
}

#[tokio::test]
async fn fault_scripts_beyond_a_thousand_queued_faults_are_refused() {
    let sim = Sim::start(sim_config()).await;
    let script = |n: usize| json!(vec![json!({"endpoint": "status", "http_status": 503}); n]);
    let refused = |script: Value| {
        let post = sim
            .http
            .post(format!("{}/_sim/faults", sim.url()))
            .header("content-type", "application/json")
            .body(script.to_string())
            .send();
        async move {
            let reply = post.await.expect("post");
            let status = reply.status();
            let body = reply.text().await.expect("body");
            assert_eq!(status, 400, "{body}");
            assert!(body.starts_with("invalid fault script: "), "{body}");
            assert!(body.contains("at most 1000"), "{body}");
        }
    };
    refused(script(1001)).await;
    assert_eq!(sim.stat("faults_queued").await, 0, "none of it queued");
    // A full queue refuses more until faults are used up.
    sim.script(script(1000)).await;
    assert_eq!(sim.stat("faults_queued").await, 1000);
    refused(script(1)).await;
    assert_eq!(sim.stat("faults_queued").await, 1000);
}
