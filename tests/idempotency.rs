//! GenerateImage with a `request_id` never pays twice (in-memory store):
//! creates outlive their callers, outcomes are shared, an unknown outcome
//! is remembered, a create that never left is forgotten, the per-token
//! guard counts creates in flight upstream, and error classes say what
//! happened without the server's internals. Over real sockets.

mod common;

use std::time::Duration;

use common::*;
use piclumen_grpc::{pb, sim, upstream::Client};
use serde_json::json;
use tokio::{net::TcpListener, time::Instant};
use tonic::{Code, Request};

fn with_id(prompt: &str, id: &str) -> pb::GenerateImageRequest {
    pb::GenerateImageRequest {
        request_id: id.into(),
        ..generate(prompt)
    }
}

/// A GenerateImage request with a request id and a deadline.
fn call(id: &str, timeout: Duration) -> Request<pb::GenerateImageRequest> {
    let mut request = authed(TOKEN, with_id("p", id));
    request.set_timeout(timeout);
    request
}

#[tokio::test]
async fn a_create_outlives_its_callers_deadline_and_a_retry_gets_its_mark_id() {
    let h = Harness::start().await;
    h.sim
        .script(json!([{"endpoint": "create", "delay_ms": 2000}]))
        .await;
    let mut client = h.client().await;
    let started = Instant::now();
    let status = client
        .generate_image(call("slow", Duration::from_secs(1)))
        .await
        .expect_err("the create takes longer than the deadline");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(started.elapsed() < Duration::from_millis(1900));

    tokio::time::sleep(Duration::from_millis(500)).await;
    let retry = client
        .generate_image(call("slow", Duration::from_secs(5)))
        .await
        .expect("the retry waits for the first create")
        .into_inner();
    assert!(!retry.mark_id.is_empty());
    assert_eq!(
        h.sim.stat("create_calls").await,
        1,
        "one create for one key"
    );
    assert_eq!(h.sim.stat("jobs").await, 1);

    let again = client
        .generate_image(call("slow", Duration::from_secs(5)))
        .await
        .expect("remembered")
        .into_inner();
    assert_eq!(again, retry, "same mark id and seed");
    assert_eq!(h.sim.stat("create_calls").await, 1);
}

#[tokio::test]
async fn callers_waiting_on_one_create_each_keep_their_own_deadline() {
    let h = Harness::start().await;
    h.sim
        .script(json!([{"endpoint": "create", "delay_ms": 1500}]))
        .await;
    let client = h.client().await;
    let patient = tokio::spawn({
        let mut client = client.clone();
        async move {
            client
                .generate_image(call("shared", Duration::from_secs(5)))
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut hasty = client.clone();
    let status = hasty
        .generate_image(call("shared", Duration::from_millis(400)))
        .await
        .expect_err("a short deadline");
    assert_status(&status, Code::DeadlineExceeded, "DEADLINE_EXCEEDED");
    let created = patient
        .await
        .expect("join")
        .expect("the patient caller gets the outcome")
        .into_inner();
    assert!(!created.mark_id.is_empty());
    assert_eq!(h.sim.stat("create_calls").await, 1);
}

#[tokio::test]
async fn a_create_without_a_reply_is_remembered_as_outcome_unknown() {
    struct Case {
        name: &'static str,
        fault: serde_json::Value,
        first_code: Code,
        first_reason: &'static str,
    }
    let cases = [
        Case {
            name: "timeout",
            fault: json!({"endpoint": "create", "delay_ms": 1500}),
            first_code: Code::DeadlineExceeded,
            first_reason: "UPSTREAM_TIMEOUT",
        },
        Case {
            name: "reset",
            fault: json!({"endpoint": "create", "reset": true, "http_status": 200, "body": "{\"status\":"}),
            first_code: Code::Aborted,
            first_reason: "CREATE_OUTCOME_UNKNOWN",
        },
        Case {
            name: "gateway timeout",
            fault: json!({"endpoint": "create", "http_status": 504, "body": "gateway timeout"}),
            first_code: Code::Aborted,
            first_reason: "CREATE_OUTCOME_UNKNOWN",
        },
        Case {
            name: "bad gateway",
            fault: json!({"endpoint": "create", "http_status": 502, "body": "bad gateway"}),
            first_code: Code::Aborted,
            first_reason: "CREATE_OUTCOME_UNKNOWN",
        },
    ];
    for case in cases {
        let sim = Sim::start(sim_config()).await;
        let mut upstream = client_config(sim.url());
        upstream.timeout = Duration::from_millis(400);
        let server =
            Server::start_with_client(server_config(), Client::new(&upstream).expect("client"))
                .await;
        let mut client = server.client().await;
        sim.script(json!([case.fault])).await;
        let first = client
            .generate_image(authed(TOKEN, with_id("p", "k")))
            .await
            .expect_err(case.name);
        assert_status(&first, case.first_code, case.first_reason);

        for _ in 0..2 {
            let retry = client
                .generate_image(authed(TOKEN, with_id("p", "k")))
                .await
                .expect_err("a retry must not create again");
            assert_status(&retry, Code::Aborted, "CREATE_OUTCOME_UNKNOWN");
            assert!(retry.message().contains("may exist"), "{}", retry.message());
            assert!(
                retry
                    .message()
                    .contains("new request_id creates regardless"),
                "{}",
                retry.message()
            );
        }
        assert_eq!(sim.stat("create_calls").await, 1, "{}", case.name);

        // A new key is the caller's decision to create regardless.
        client
            .generate_image(authed(TOKEN, with_id("p", "k2")))
            .await
            .expect("a new request_id creates");
        assert_eq!(sim.stat("create_calls").await, 2, "{}", case.name);
    }
}

#[tokio::test]
async fn a_definite_refusal_is_forgotten_so_a_retry_can_create() {
    let cases = [
        json!({"endpoint": "create", "http_status": 401, "body": "{}"}),
        json!({"endpoint": "create", "http_status": 400, "body": "bad field"}),
        json!({"endpoint": "create", "http_status": 500, "body": "oops"}),
        json!({"endpoint": "create", "http_status": 200,
               "body": "{\"status\": 1001, \"message\": \"insufficient credits\"}"}),
    ];
    for (n, fault) in cases.into_iter().enumerate() {
        let h = Harness::start().await;
        let mut client = h.client().await;
        h.sim.script(json!([fault])).await;
        let id = format!("refused-{n}");
        client
            .generate_image(authed(TOKEN, with_id("p", &id)))
            .await
            .expect_err("refused");
        client
            .generate_image(authed(TOKEN, with_id("p", &id)))
            .await
            .expect("the retry creates");
        assert_eq!(h.sim.stat("create_calls").await, 2, "{fault}");
    }
}

#[tokio::test]
async fn a_create_that_never_connected_is_forgotten_and_says_nothing_of_the_url() {
    let addr = unused_addr();
    let server = Server::start(server_config(), format!("http://operator:hunter2@{addr}")).await;
    let mut client = server.client().await;
    let status = client
        .generate_image(authed(TOKEN, with_id("p", "refused")))
        .await
        .expect_err("nothing listens");
    assert_status(&status, Code::Unavailable, "UPSTREAM_UNAVAILABLE");
    let message = status.message();
    assert!(message.contains("cannot reach Piclumen"), "{message}");
    for internal in [
        "hunter2",
        "operator",
        "127.0.0.1",
        "http",
        "tcp",
        "error sending",
    ] {
        assert!(!message.contains(internal), "{internal:?} in {message:?}");
    }

    // Piclumen comes up where it was expected: the retry creates.
    let listener = TcpListener::bind(addr).await.expect("bind the old address");
    let sim_task = tokio::spawn(sim::serve(listener, sim_config(), std::future::pending()));
    let created = client
        .generate_image(authed(TOKEN, with_id("p", "refused")))
        .await
        .expect("the retry creates")
        .into_inner();
    assert!(!created.mark_id.is_empty());
    sim_task.abort();
}

#[tokio::test]
async fn transport_details_stay_server_side_without_credentials() {
    let addr = unused_addr();
    let client =
        Client::new(&client_config(format!("http://operator:hunter2@{addr}"))).expect("client");
    let payload = piclumen_grpc::convert::create_payload(&generate("p"), &Default::default())
        .expect("payload");
    let error = client
        .create(&token(TOKEN), &payload, None)
        .await
        .expect_err("refused");
    assert!(!error.may_have_reached_upstream(), "{error:?}");
    let detail = error.detail().expect("a transport error keeps its chain");
    assert!(detail.contains("onnect"), "the chain says why: {detail}");
    assert!(
        !detail.contains("hunter2") && !detail.contains("operator"),
        "{detail}"
    );
    assert!(!error.to_string().contains(&addr.to_string()));
}

#[tokio::test]
async fn the_guard_counts_creates_whose_callers_left() {
    let mut config = server_config();
    config.service.max_generates_per_token = 1;
    let h = Harness::with(sim_config(), config).await;
    h.sim
        .script(json!([{"endpoint": "create", "delay_ms": 1500}]))
        .await;
    let mut client = h.client().await;
    let status = client
        .generate_image(call("first", Duration::from_millis(300)))
        .await
        .expect_err("the caller gives up early");
    assert_eq!(status.code(), Code::DeadlineExceeded);

    // Its create still runs upstream and holds the token's only place.
    let status = client
        .generate_image(call("second", Duration::from_secs(5)))
        .await
        .expect_err("no second create while the first runs");
    assert_status(&status, Code::ResourceExhausted, "SERVER_LIMIT");
    let status = client
        .generate_image(authed(TOKEN, generate("no key")))
        .await
        .expect_err("nor one without a request_id");
    assert_status(&status, Code::ResourceExhausted, "SERVER_LIMIT");
    assert_eq!(h.sim.stat("create_calls").await, 1);

    // A retry of the running key joins it instead of taking a place.
    let first = client
        .generate_image(call("first", Duration::from_secs(5)))
        .await
        .expect("joins the running create")
        .into_inner();
    assert!(!first.mark_id.is_empty());

    // Once it ended, the place is free again.
    let second = client
        .generate_image(call("second", Duration::from_secs(5)))
        .await
        .expect("the place is free")
        .into_inner();
    assert_ne!(second.mark_id, first.mark_id);
    assert_eq!(h.sim.stat("create_calls").await, 2);
}

#[tokio::test]
async fn a_request_that_cannot_be_built_is_not_unreachable_nor_retried() {
    let mut config = server_config();
    config.hub.failure_budget = Duration::from_secs(60);
    // A URL reqwest will not send (a scheme it does not speak): the
    // request cannot be built. (`serve` refuses such a URL at start; the
    // client's own classification is what is tested here.)
    let server = Server::start(config, "file:///bad-host".into()).await;
    let mut client = server.client().await;
    for _ in 0..2 {
        let status = client
            .generate_image(authed(TOKEN, with_id("p", "unbuildable")))
            .await
            .expect_err("cannot be built");
        assert_status(&status, Code::Internal, "UPSTREAM_REQUEST_INVALID");
        assert!(!status.message().contains("cannot reach"), "{status:?}");
        assert!(!status.message().contains("bad host"), "{status:?}");
    }
    // WatchImage does not ride it out as transient trouble: it ends at once
    // with the same, long before the 60 s failure budget.
    let started = Instant::now();
    let (_, end) = collect_watch(&mut client, TOKEN, "m").await;
    assert_status(
        &end.expect_err("ends"),
        Code::Internal,
        "UPSTREAM_REQUEST_INVALID",
    );
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[test]
fn the_startup_line_leaves_out_upstream_credentials() {
    let server = Process::serve(
        &[
            "--listen",
            "127.0.0.1:0",
            "--upstream-url",
            "http://op:hunter2@127.0.0.1:9",
            "--idempotency-store",
            "redis://:sesame@127.0.0.1:9/0",
        ],
        &[],
    );
    let startup = server.listening_line();
    assert!(startup.contains("127.0.0.1:9"), "{startup}");
    for line in &server.startup_log() {
        assert!(
            !line.contains("hunter2") && !line.contains("sesame"),
            "{line}"
        );
    }
}
