//! Each upstream fault maps to its gRPC code, reason and details, for
//! GenerateImage and CheckImage; deadlines answer DEADLINE_EXCEEDED.

mod common;

use std::time::Duration;

use common::*;
use piclumen_grpc::{job::Token, pb};
use serde_json::{Value, json};
use tonic::{Code, Status};
use tonic_types::StatusExt;

struct Case {
    fault: Value,
    code: Code,
    reason: &'static str,
    message_has: &'static str,
    /// Sent without a usable reply: a create's outcome is unknown, so
    /// GenerateImage answers ABORTED, never a code clients retry alone.
    unknown_on_create: bool,
}

fn cases() -> Vec<Case> {
    let c = |fault: Value, code, reason, message_has| Case {
        fault,
        code,
        reason,
        message_has,
        unknown_on_create: false,
    };
    let unknown = |case: Case| Case {
        unknown_on_create: true,
        ..case
    };
    vec![
        c(
            json!({"http_status": 400, "body": "bad field"}),
            Code::InvalidArgument,
            "UPSTREAM_BAD_REQUEST",
            "bad field",
        ),
        c(
            json!({"http_status": 401, "body": "{}"}),
            Code::Unauthenticated,
            "TOKEN_REJECTED",
            "401",
        ),
        c(
            json!({"http_status": 403, "body": "{}"}),
            Code::PermissionDenied,
            "PERMISSION_DENIED",
            "403",
        ),
        c(
            json!({"http_status": 404, "body": "nope"}),
            Code::Internal,
            "UPSTREAM_HTTP_ERROR",
            "404",
        ),
        c(
            json!({"http_status": 429, "body": "{}"}),
            Code::ResourceExhausted,
            "UPSTREAM_RATE_LIMITED",
            "429",
        ),
        // 408 Request Timeout: the upstream gave up waiting, which passes.
        c(
            json!({"http_status": 408, "body": "too slow"}),
            Code::Unavailable,
            "UPSTREAM_UNAVAILABLE",
            "408",
        ),
        c(
            json!({"http_status": 500, "body": "oops"}),
            Code::Unavailable,
            "UPSTREAM_UNAVAILABLE",
            "500",
        ),
        unknown(c(
            json!({"http_status": 502, "body": "oops"}),
            Code::Unavailable,
            "UPSTREAM_UNAVAILABLE",
            "502",
        )),
        c(
            json!({"http_status": 503, "body": "oops"}),
            Code::Unavailable,
            "UPSTREAM_UNAVAILABLE",
            "503",
        ),
        unknown(c(
            json!({"http_status": 504, "body": "oops"}),
            Code::Unavailable,
            "UPSTREAM_UNAVAILABLE",
            "504",
        )),
        c(
            json!({"http_status": 200, "body": "<html>maintenance</html>"}),
            Code::Internal,
            "UPSTREAM_BAD_REPLY",
            "<html>maintenance</html>",
        ),
        c(
            json!({"http_status": 200, "body": "{\"status\": 0, \"data\": {\"markId\": 5}}"}),
            Code::Internal,
            "UPSTREAM_BAD_REPLY",
            "markId",
        ),
        c(
            json!({"http_status": 200, "body": "{\"status\": 1001, \"message\": \"insufficient credits\"}"}),
            Code::FailedPrecondition,
            "UPSTREAM_REJECTED",
            "insufficient credits",
        ),
        unknown(c(
            json!({"reset": true, "http_status": 200, "body": "{\"status\":"}),
            Code::Unavailable,
            "UPSTREAM_UNAVAILABLE",
            "Piclumen",
        )),
    ]
}

async fn check_all(endpoint: &str) {
    let h = Harness::start().await;
    let mut client = h.client().await;
    for (i, case) in cases().into_iter().enumerate() {
        let mut fault = case.fault.clone();
        // A token per case: a 429 or 5xx pauses its token's status calls,
        // and the next case must meet its own fault, not that pause.
        let token = format!("{TOKEN}-{i}");
        fault["endpoint"] = json!(endpoint);
        fault["token"] = json!(token);
        if endpoint == "status" && case.code == Code::Unavailable {
            // Passing trouble is asked again once within the round: only
            // when the retry meets it too does it reach the check.
            fault["times"] = json!(2);
        }
        h.sim.script(json!([fault])).await;
        let status: Status = if endpoint == "create" {
            client
                .generate_image(authed(&token, generate("p")))
                .await
                .expect_err("fault")
        } else {
            client
                .check_image(authed(&token, check_request("m1")))
                .await
                .expect_err("fault")
        };
        if endpoint == "create" && case.unknown_on_create {
            assert_status(&status, Code::Aborted, "CREATE_OUTCOME_UNKNOWN");
            assert!(
                status.message().contains("may exist"),
                "{}",
                status.message()
            );
        } else {
            assert_status(&status, case.code, case.reason);
        }
        assert!(
            status.message().contains(case.message_has),
            "{endpoint} {:?}: message {:?} lacks {:?}",
            case.fault,
            status.message(),
            case.message_has
        );
    }
}

#[tokio::test]
async fn generate_image_maps_every_upstream_fault() {
    check_all("create").await;
}

#[tokio::test]
async fn check_image_maps_every_upstream_fault() {
    check_all("status").await;
}

#[tokio::test]
async fn rate_limit_carries_retry_info() {
    let h = Harness::start().await;
    h.sim.script(json!([{"endpoint": "create", "http_status": 429, "body": "{}", "headers": {"Retry-After": "7"}}])).await;
    let mut client = h.client().await;
    let status = client
        .generate_image(authed(TOKEN, generate("p")))
        .await
        .expect_err("429");
    assert_status(&status, Code::ResourceExhausted, "UPSTREAM_RATE_LIMITED");
    let details = status.get_error_details();
    assert_eq!(
        details.retry_info().expect("RetryInfo").retry_delay,
        Some(Duration::from_secs(7))
    );
    // gRFC A6's pushback, for clients with a retry policy.
    assert_eq!(
        status
            .metadata()
            .get("grpc-retry-pushback-ms")
            .and_then(|v| v.to_str().ok()),
        Some("7000")
    );
}

#[tokio::test]
async fn rate_limit_without_retry_after_carries_no_retry_info() {
    let h = Harness::start().await;
    h.sim
        .script(json!([{"endpoint": "any", "http_status": 429, "body": "{}", "times": 2}]))
        .await;
    let mut client = h.client().await;
    let generate = client
        .generate_image(authed(TOKEN, generate("p")))
        .await
        .expect_err("429");
    let check = client
        .check_image(authed(TOKEN, check_request("m1")))
        .await
        .expect_err("429");
    for status in [generate, check] {
        assert_status(&status, Code::ResourceExhausted, "UPSTREAM_RATE_LIMITED");
        // No delay was given: the server must not invent one.
        assert!(
            status.get_error_details().retry_info().is_none(),
            "RetryInfo without Retry-After: {status:?}"
        );
    }
    assert_eq!(h.sim.stat("scripted_faults").await, 2);
}

#[tokio::test]
async fn a_watch_retries_past_a_408() {
    let h = Harness::start().await;
    let mut client = h.client().await;
    let mark_id = start_job(&mut client, TOKEN, "p").await;
    h.sim
        .script(json!([{"endpoint": "status", "http_status": 408, "body": "too slow", "times": 2}]))
        .await;
    let (messages, end) = collect_watch(&mut client, TOKEN, &mark_id).await;
    end.expect("a 408 is transient: the watch rides it out");
    assert_eq!(states(&messages).last(), Some(&pb::JobState::Succeeded));
    assert_eq!(
        h.sim.stat("scripted_faults").await,
        2,
        "both 408s were answered"
    );
}

#[tokio::test]
async fn unknown_job_and_empty_data_are_not_found() {
    let h = Harness::start().await;
    let mut client = h.client().await;
    let check = |id: &str| authed(TOKEN, check_request(id));
    let status = client
        .check_image(check("no-such-job"))
        .await
        .expect_err("unknown");
    assert_status(&status, Code::NotFound, "JOB_NOT_FOUND");
    h.sim.script(json!([{"endpoint": "status", "http_status": 200, "body": "{\"status\":0,\"message\":\"success\",\"data\":null}"}])).await;
    let status = client.check_image(check("x")).await.expect_err("null data");
    assert_status(&status, Code::NotFound, "JOB_NOT_FOUND");
    let status = client.check_image(check("  ")).await.expect_err("empty id");
    assert_status(&status, Code::InvalidArgument, "INVALID_REQUEST");
}

#[tokio::test]
async fn unknown_upstream_state_is_shown_not_hidden() {
    let h = Harness::start().await;
    let mut client = h.client().await;
    h.sim
        .script(json!([{"endpoint": "status", "http_status": 200,
        "body": "{\"status\":0,\"data\":[{\"markId\":\"m1\",\"status\":\"exploded\"}]}"}]))
        .await;
    let job = client
        .check_image(authed(TOKEN, check_request("m1")))
        .await
        .expect("check")
        .into_inner()
        .job
        .expect("job");
    assert_eq!(job.state(), pb::JobState::Unspecified);
    assert_eq!(job.upstream_status, "exploded");
}

#[tokio::test]
async fn connect_refused_is_unavailable() {
    // A port that was just free: nothing listens there.
    let server = Server::start(server_config(), format!("http://{}", unused_addr())).await;
    let mut client = server.client().await;
    assert_unary_calls_fail(&mut client, Code::Unavailable, "UPSTREAM_UNAVAILABLE").await;
}

#[tokio::test]
async fn upstream_slower_than_its_timeout_is_deadline_exceeded() {
    let sim = Sim::start(sim_config()).await;
    let mut config = client_config(sim.url());
    config.timeout = Duration::from_millis(200);
    let client = piclumen_grpc::upstream::Client::new(&config).expect("client");
    let server = Server::start_with_client(server_config(), client).await;
    sim.script(json!([{"endpoint": "any", "delay_ms": 1000, "times": 2}]))
        .await;
    let mut grpc = server.client().await;
    assert_unary_calls_fail(&mut grpc, Code::DeadlineExceeded, "UPSTREAM_TIMEOUT").await;
}

#[tokio::test]
async fn caller_deadline_bounds_the_upstream_call() {
    let h = Harness::start().await;
    h.sim
        .script(json!([
            {"endpoint": "create", "delay_ms": 3000},
            {"endpoint": "status", "delay_ms": 3000}
        ]))
        .await;
    let mut client = h.client().await;
    let mut request = authed(TOKEN, generate("p"));
    request.set_timeout(Duration::from_millis(400));
    let started = std::time::Instant::now();
    let status = client.generate_image(request).await.expect_err("deadline");
    assert_status(&status, Code::DeadlineExceeded, "DEADLINE_EXCEEDED");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered at the deadline, not after the upstream"
    );

    let mut request = authed(TOKEN, check_request("m"));
    request.set_timeout(Duration::from_millis(400));
    let status = client.check_image(request).await.expect_err("deadline");
    assert_status(&status, Code::DeadlineExceeded, "DEADLINE_EXCEEDED");
}

#[tokio::test]
async fn rejected_default_token_is_internal_for_the_caller() {
    let mut sim = sim_config();
    sim.tokens = vec![piclumen_grpc::job::Token::parse(TOKEN).expect("token")];
    let sim = Sim::start(sim).await;
    let mut config = server_config();
    config.service.default_token = Token::new("expired-server-token");
    let server = Server::start(config, sim.url()).await;
    let mut client = server.client().await;
    let status = client
        .generate_image(generate("p"))
        .await
        .expect_err("default token rejected");
    assert_status(&status, Code::Internal, "DEFAULT_TOKEN_REJECTED");
    assert!(!status.message().contains("expired-server-token"));
    // The caller's own bad token is the caller's to fix.
    let status = client
        .generate_image(authed("wrong", generate("p")))
        .await
        .expect_err("caller token rejected");
    assert_status(&status, Code::Unauthenticated, "TOKEN_REJECTED");
    client
        .generate_image(authed(TOKEN, generate("p")))
        .await
        .expect("accepted token");
}

#[tokio::test]
async fn a_reply_over_the_size_limit_is_refused_and_its_connection_dropped() {
    let h = Harness::start().await;
    let mut client = h.client().await;
    let check = |mark_id: &str| authed(TOKEN, check_request(mark_id));
    // A first call opens the one connection the rest would reuse.
    let _ = client.check_image(check("m0")).await;
    let opened = h.sim.stat("connections").await;
    let huge = "x".repeat(piclumen_grpc::upstream::MAX_REPLY_BYTES + 1);
    h.sim
        .script(json!([{"endpoint": "status", "http_status": 200, "body": huge}]))
        .await;
    let status = client
        .check_image(check("m1"))
        .await
        .expect_err("too large");
    assert_status(&status, Code::Internal, "UPSTREAM_BAD_REPLY");
    assert!(
        status.message().contains("larger than"),
        "{}",
        status.message()
    );
    // The unread rest of that reply cannot be skipped: its connection is
    // closed, and the next call opens another.
    let _ = client.check_image(check("m2")).await;
    assert_eq!(h.sim.stat("connections").await, opened + 1);
}
