//! The first version's HTTP contract (`--http-listen`) over real sockets:
//! the old shapes key for key, the status mapping, FastAPI's 422 list,
//! `/openapi.json` and `/docs`, and that HTTP and gRPC share one service.

mod common;

use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use common::{
    OTHER_TOKEN, Sim, TOKEN, authed, check_request,
    http::{WithHttp, with_http},
    server_config, sim_config,
};
use piclumen_grpc::{
    auth::ApiKeys,
    pb::{self, image_service_client::ImageServiceClient},
    server::{ServerConfig, ServerError},
    sim::SimConfig,
};
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;

/// The first version's example body, verbatim from its documentation (the
/// contract's create body: tests/fixtures/README.md).
const EXAMPLE_BODY: &str = include_str!("fixtures/create_body.json");

/// A simulator and one server process serving gRPC and the HTTP API.
struct Legacy {
    sim: Sim,
    grpc: SocketAddr,
    http: SocketAddr,
    web: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServerError>>,
}

/// One HTTP answer.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: HeaderMap,
    body: Value,
}

impl Legacy {
    async fn start() -> Self {
        Self::with(sim_config(), server_config()).await
    }

    async fn with(sim: SimConfig, config: ServerConfig) -> Self {
        let WithHttp {
            sim,
            grpc,
            http,
            stop,
            task,
        } = with_http(sim, config).await;
        Self {
            sim,
            grpc,
            http,
            web: reqwest::Client::new(),
            stop: Some(stop),
            task,
        }
    }

    async fn grpc_client(&self) -> ImageServiceClient<Channel> {
        let channel = Channel::from_shared(format!("http://{}", self.grpc))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        ImageServiceClient::new(channel)
    }

    async fn post(
        &self,
        path_and_query: &str,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut request = self
            .web
            .post(format!("http://{}{path_and_query}", self.http));
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_owned());
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.expect("http post");
        answer(response).await
    }

    async fn generate(&self, token: &str, body: &str) -> Answer {
        self.post(
            &format!("/generate-image?authorization_token={token}"),
            Some(body),
            &[],
        )
        .await
    }

    async fn check(&self, token: &str, mark_id: &str) -> Answer {
        self.post(
            &format!("/check-image?authorization_token={token}&mark_id={mark_id}"),
            None,
            &[],
        )
        .await
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let response = self
            .web
            .get(format!("http://{}{path}", self.http))
            .send()
            .await
            .expect("http get");
        let status = response.status().as_u16();
        (status, response.text().await.expect("text"))
    }
}

impl Drop for Legacy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}

async fn answer(response: reqwest::Response) -> Answer {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.expect("body");
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)));
    Answer {
        status,
        headers,
        body,
    }
}

fn keys(body: &Value) -> BTreeSet<&str> {
    body.as_object()
        .expect("a JSON object")
        .keys()
        .map(String::as_str)
        .collect()
}

fn assert_keys(body: &Value, expected: &[&str]) {
    assert_eq!(
        keys(body),
        expected.iter().copied().collect(),
        "keys of {body}"
    );
}

/// Asserts the error shape: the HTTP code repeated, a message, the reason.
fn assert_error(answer: &Answer, status: u16, reason: &str) {
    assert_eq!(answer.status, status, "{answer:?}");
    assert_keys(&answer.body, &["statuscode", "message", "reason"]);
    assert_eq!(answer.body["statuscode"], status);
    assert_eq!(answer.body["reason"], reason);
    assert!(
        !answer.body["message"].as_str().expect("message").is_empty(),
        "{answer:?}"
    );
}

/// Checks the job every 20 ms until it is no longer processing (at most
/// 30 s), asserting the 202 shape on the way: the statuses reported while
/// processing, and the final answer.
async fn until_done(legacy: &Legacy, id: &str) -> (BTreeSet<String>, Answer) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut seen = BTreeSet::new();
    loop {
        let answer = legacy.check(TOKEN, id).await;
        if answer.status != 202 {
            return (seen, answer);
        }
        assert_keys(&answer.body, &["statuscode", "message", "mark_id"]);
        assert_eq!(answer.body["statuscode"], 202);
        assert_eq!(answer.body["mark_id"], id);
        let message = answer.body["message"].as_str().expect("message");
        let status = message
            .strip_prefix("Image still processing. Current status: ")
            .unwrap_or_else(|| panic!("unexpected message {message:?}"));
        seen.insert(status.to_owned());
        assert!(
            tokio::time::Instant::now() < deadline,
            "still processing after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn mark_id(answer: &Answer) -> String {
    answer.body["mark_id"].as_str().expect("mark_id").to_owned()
}

#[tokio::test]
async fn the_first_versions_example_starts_a_job_with_its_values() {
    let legacy = Legacy::start().await;
    let started = legacy.generate(TOKEN, EXAMPLE_BODY).await;
    assert_eq!(started.status, 200, "{started:?}");
    assert_keys(&started.body, &["statuscode", "message", "mark_id"]);
    assert_eq!(started.body["statuscode"], 200);
    assert_eq!(started.body["message"], "Image creation initiated");
    assert!(!mark_id(&started).is_empty());

    let creates = legacy.sim.creates().await;
    let sent = &creates.as_array().expect("creates")[0]["body"];
    let example: Value = serde_json::from_str(EXAMPLE_BODY).expect("example");
    assert_eq!(sent, &example, "Piclumen received other values");
}

#[tokio::test]
async fn check_image_reports_pending_then_running_then_the_first_image() {
    let sim = SimConfig {
        job_duration: Duration::from_secs(4),
        ..sim_config()
    };
    let legacy = Legacy::with(sim, server_config()).await;
    let body = json!({"prompt": "two images", "resolution": {"batch_size": 2}}).to_string();
    let id = mark_id(&legacy.generate(TOKEN, &body).await);

    let (seen, done) = until_done(&legacy, &id).await;
    assert_eq!(
        seen,
        ["pending", "running"].map(String::from).into(),
        "states reported while processing"
    );

    assert_eq!(done.status, 200, "{done:?}");
    assert_keys(&done.body, &["statuscode", "message", "image_url"]);
    assert_eq!(done.body["statuscode"], 200);
    assert_eq!(done.body["message"], "Image generation successful");
    let job = legacy
        .grpc_client()
        .await
        .check_image(authed(TOKEN, check_request(id)))
        .await
        .expect("gRPC CheckImage")
        .into_inner()
        .job
        .expect("job");
    assert_eq!(job.images.len(), 2);
    assert_eq!(done.body["image_url"], job.images[0].url.as_str());
}

#[tokio::test]
async fn a_failed_job_is_500_with_its_mark_id() {
    let legacy = Legacy::start().await;
    let id = mark_id(
        &legacy
            .generate(TOKEN, r#"{"prompt": "[sim:fail] x"}"#)
            .await,
    );
    let (_, failed) = until_done(&legacy, &id).await;
    assert_eq!(failed.status, 500, "{failed:?}");
    assert_eq!(
        failed.body,
        json!({
            "statuscode": 500,
            "message": "Image generation failed. Current status: failed",
            "mark_id": id,
        })
    );
}

#[tokio::test]
async fn missing_query_parameters_get_fastapis_detail_list() {
    let legacy = Legacy::start().await;
    let check = legacy.post("/check-image", None, &[]).await;
    assert_eq!(check.status, 422);
    assert_eq!(
        check.body,
        json!({"detail": [
            {"type": "missing", "loc": ["query", "authorization_token"], "msg": "Field required", "input": null},
            {"type": "missing", "loc": ["query", "mark_id"], "msg": "Field required", "input": null},
        ]})
    );
    let check = legacy
        .post("/check-image?authorization_token=t", None, &[])
        .await;
    assert_eq!(check.status, 422);
    assert_eq!(
        check.body,
        json!({"detail": [
            {"type": "missing", "loc": ["query", "mark_id"], "msg": "Field required", "input": null},
        ]})
    );
    let generate = legacy
        .post("/generate-image", Some(EXAMPLE_BODY), &[])
        .await;
    assert_eq!(generate.status, 422);
    assert_eq!(
        generate.body,
        json!({"detail": [
            {"type": "missing", "loc": ["query", "authorization_token"], "msg": "Field required", "input": null},
        ]})
    );
    assert_eq!(legacy.sim.stat("create_calls").await, 0);
}

#[tokio::test]
async fn bodies_that_are_not_json_or_of_the_wrong_types_get_422() {
    let legacy = Legacy::start().await;
    let cut = legacy.generate(TOKEN, r#"{"prompt": "#).await;
    assert_eq!(cut.status, 422, "{cut:?}");
    let detail = &cut.body["detail"][0];
    assert_eq!(detail["type"], "json_invalid");
    assert_eq!(detail["loc"], json!(["body", 11]));
    assert_eq!(detail["msg"], "JSON decode error");

    let wrong = legacy
        .generate(
            TOKEN,
            r#"{"prompt": "p", "steps": "many", "highPixels": []}"#,
        )
        .await;
    assert_eq!(wrong.status, 422, "{wrong:?}");
    assert_eq!(
        wrong.body,
        json!({"detail": [
            {"type": "int_parsing", "loc": ["body", "steps"],
             "msg": "Input should be a valid integer, unable to parse string as an integer", "input": "many"},
            {"type": "bool_type", "loc": ["body", "highPixels"],
             "msg": "Input should be a valid boolean", "input": []},
        ]})
    );

    let none = legacy
        .post("/generate-image?authorization_token=t", None, &[])
        .await;
    assert_eq!(none.status, 422);
    assert_eq!(
        none.body,
        json!({"detail": [{"type": "missing", "loc": ["body"], "msg": "Field required", "input": null}]})
    );
    assert_eq!(legacy.sim.stat("create_calls").await, 0);
}

#[tokio::test]
async fn an_invalid_field_is_400_and_never_reaches_piclumen() {
    let legacy = Legacy::start().await;
    let answer = legacy
        .generate(TOKEN, r#"{"prompt": "p", "resolution": {"width": 10}}"#)
        .await;
    assert_error(&answer, 400, "INVALID_REQUEST");
    let message = answer.body["message"].as_str().expect("message");
    assert!(message.starts_with("resolution.width: "), "{message}");

    let empty = legacy.generate(TOKEN, "{}").await;
    assert_error(&empty, 400, "INVALID_REQUEST");
    assert_eq!(empty.body["message"], "prompt: must not be empty");
    assert_eq!(legacy.sim.stat("create_calls").await, 0);
}

#[tokio::test]
async fn a_token_piclumen_rejects_is_401() {
    let sim = SimConfig {
        tokens: vec![piclumen_grpc::job::Token::parse(TOKEN).expect("token")],
        ..sim_config()
    };
    let legacy = Legacy::with(sim, server_config()).await;
    let generate = legacy.generate("not-a-token", EXAMPLE_BODY).await;
    assert_error(&generate, 401, "TOKEN_REJECTED");
    let check = legacy.check("not-a-token", "0123").await;
    assert_error(&check, 401, "TOKEN_REJECTED");
    // A token that cannot be a header value never leaves the server.
    let control = legacy.check("a%0Ab", "0123").await;
    assert_error(&control, 401, "TOKEN_MALFORMED");
    assert_eq!(legacy.sim.stat("create_calls").await, 1);
}

#[tokio::test]
async fn another_tokens_or_an_unknown_job_is_404() {
    let legacy = Legacy::start().await;
    let unknown = legacy.check(TOKEN, "no-such-job").await;
    assert_error(&unknown, 404, "JOB_NOT_FOUND");
    let id = mark_id(&legacy.generate(TOKEN, r#"{"prompt": "mine"}"#).await);
    let theirs = legacy.check(OTHER_TOKEN, &id).await;
    assert_error(&theirs, 404, "JOB_NOT_FOUND");
}

#[tokio::test]
async fn upstream_rate_limits_are_429_with_retry_after() {
    let legacy = Legacy::start().await;
    legacy
        .sim
        .script(json!([{
            "endpoint": "create", "http_status": 429, "body": "slow down",
            "headers": {"retry-after": "7"},
        }]))
        .await;
    let answer = legacy.generate(TOKEN, r#"{"prompt": "p"}"#).await;
    assert_error(&answer, 429, "UPSTREAM_RATE_LIMITED");
    assert_eq!(
        answer.headers.get("retry-after").map(|v| v.as_bytes()),
        Some(&b"7"[..])
    );
}

#[tokio::test]
async fn api_keys_apply_to_http_callers_too() {
    let mut config = server_config();
    config.service.api_keys = Some(ApiKeys::parse("key-one\n").expect("keys"));
    let legacy = Legacy::with(sim_config(), config).await;
    let path = format!("/generate-image?authorization_token={TOKEN}");
    let without = legacy.post(&path, Some(EXAMPLE_BODY), &[]).await;
    assert_error(&without, 401, "API_KEY_MISSING");
    let wrong = legacy
        .post(&path, Some(EXAMPLE_BODY), &[("x-api-key", "key-two")])
        .await;
    assert_error(&wrong, 401, "API_KEY_INVALID");
    let right = legacy
        .post(&path, Some(EXAMPLE_BODY), &[("x-api-key", "key-one")])
        .await;
    assert_eq!(right.status, 200, "{right:?}");
    assert_eq!(legacy.sim.stat("create_calls").await, 1);
}

#[tokio::test]
async fn an_idempotency_key_shares_the_grpc_request_id_store() {
    let legacy = Legacy::start().await;
    let request = pb::GenerateImageRequest {
        prompt: "once".into(),
        seed: Some(42),
        request_id: "retry-1".into(),
        ..Default::default()
    };
    let first = legacy
        .grpc_client()
        .await
        .generate_image(authed(TOKEN, request))
        .await
        .expect("gRPC GenerateImage")
        .into_inner();
    let path = format!("/generate-image?authorization_token={TOKEN}");
    let body = r#"{"prompt": "once", "seed": 42}"#;
    let again = legacy
        .post(&path, Some(body), &[("idempotency-key", "retry-1")])
        .await;
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(mark_id(&again), first.mark_id);
    let reused = legacy
        .post(
            &path,
            Some(r#"{"prompt": "other"}"#),
            &[("idempotency-key", "retry-1")],
        )
        .await;
    assert_error(&reused, 400, "INVALID_REQUEST");
    assert_eq!(legacy.sim.stat("create_calls").await, 1);
}

#[tokio::test]
async fn a_body_over_the_limit_is_413() {
    let mut config = server_config();
    config.max_request_bytes = 1024;
    let legacy = Legacy::with(sim_config(), config).await;
    let body = json!({ "prompt": "x".repeat(2048) }).to_string();
    let answer = legacy.generate(TOKEN, &body).await;
    assert_eq!(answer.status, 413, "{answer:?}");
    assert_eq!(answer.body["statuscode"], 413);
    assert_eq!(legacy.sim.stat("create_calls").await, 0);
}

#[tokio::test]
async fn openapi_lists_both_endpoints_and_docs_serve_swagger_ui() {
    let legacy = Legacy::start().await;
    let (status, text) = legacy.get("/openapi.json").await;
    assert_eq!(status, 200);
    let doc: Value = serde_json::from_str(&text).expect("OpenAPI JSON");
    assert!(doc["openapi"].as_str().expect("version").starts_with("3."));
    let generate = &doc["paths"]["/generate-image"]["post"];
    let check = &doc["paths"]["/check-image"]["post"];
    let params = |op: &Value| -> Vec<String> {
        op["parameters"]
            .as_array()
            .expect("parameters")
            .iter()
            .filter(|p| p["in"] == "query")
            .map(|p| p["name"].as_str().expect("name").to_owned())
            .collect()
    };
    assert_eq!(params(generate), ["authorization_token"]);
    assert_eq!(params(check), ["authorization_token", "mark_id"]);
    assert!(generate["requestBody"].is_object());
    for code in ["200", "400", "401", "422", "429", "503"] {
        assert!(generate["responses"][code].is_object(), "generate {code}");
    }
    for code in ["200", "202", "404", "422", "500"] {
        assert!(check["responses"][code].is_object(), "check {code}");
    }
    let body = &doc["components"]["schemas"]["GenerateImageBody"]["properties"];
    for field in [
        "prompt",
        "highPixels",
        "ponyTags",
        "continueCreate",
        "resolution",
    ] {
        assert!(body[field].is_object(), "body field {field}");
    }

    let (status, html) = legacy.get("/docs").await;
    assert_eq!(status, 200);
    assert!(html.contains("swagger-ui"), "{html}");
    let (status, init) = legacy.get("/docs/swagger-initializer.js").await;
    assert_eq!(status, 200);
    assert!(init.contains("/openapi.json"), "{init}");
    let (status, bundle) = legacy.get("/docs/swagger-ui-bundle.js").await;
    assert_eq!(status, 200);
    assert!(bundle.len() > 100_000, "the bundled Swagger UI is missing");
}

#[tokio::test]
async fn shutdown_stops_the_http_listener_too() {
    let mut legacy = Legacy::start().await;
    assert_eq!(legacy.check(TOKEN, "x").await.status, 404);
    if let Some(stop) = legacy.stop.take() {
        let _ = stop.send(());
    }
    let result = tokio::time::timeout(Duration::from_secs(10), &mut legacy.task)
        .await
        .expect("the server stops within its drain")
        .expect("no panic");
    assert!(result.is_ok(), "{result:?}");
    assert!(
        tokio::net::TcpStream::connect(legacy.http).await.is_err(),
        "the HTTP port still accepts"
    );
}

/// A job checked once, then Piclumen's status calls all failing: `(HTTP
/// answer, gRPC answer)` of a check one second into the outage.
async fn checked_through_an_outage(
    stale_if_error: Duration,
) -> (Answer, Result<pb::ImageJob, tonic::Status>) {
    let sim = SimConfig {
        job_duration: Duration::from_secs(600),
        ..sim_config()
    };
    let mut config = server_config();
    config.hub.stale_if_error = stale_if_error;
    let legacy = Legacy::with(sim, config).await;
    let started = legacy.generate(TOKEN, EXAMPLE_BODY).await;
    let mark_id = started.body["mark_id"]
        .as_str()
        .expect("mark id")
        .to_owned();
    let fresh = legacy.check(TOKEN, &mark_id).await;
    assert_eq!(fresh.status, 202, "{:?}", fresh.body);
    let age: u64 = fresh.headers["age"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!(age <= 1, "a state just confirmed: Age {age}");
    legacy
        .sim
        .script(json!([{"endpoint": "status", "http_status": 503, "body": "down", "times": 1000}]))
        .await;
    // Past several intervals (200 ms): the token is paused and its last
    // state is older than one interval.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let http = legacy.check(TOKEN, &mark_id).await;
    let grpc = legacy
        .grpc_client()
        .await
        .check_image(authed(TOKEN, check_request(mark_id)))
        .await
        .map(|answer| answer.into_inner().job.expect("job"));
    (http, grpc)
}

#[tokio::test]
async fn checks_answer_a_recent_state_through_an_outage_with_its_age() {
    let (http, grpc) = checked_through_an_outage(Duration::from_secs(30)).await;
    assert_eq!(http.status, 202, "{:?}", http.body);
    assert!(http.headers.contains_key("age"), "{:?}", http.headers);
    let job = grpc.expect("the last state, not the outage");
    assert_eq!(job.state(), pb::JobState::Pending);
    let observed = job.observed_at.expect("observed_at");
    let age = std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::try_from(observed).expect("a time"))
        .expect("in the past");
    assert!(
        (Duration::from_millis(500)..Duration::from_secs(30)).contains(&age),
        "observed {age:?} ago"
    );
}

#[tokio::test]
async fn without_stale_if_error_checks_fail_through_an_outage() {
    let (http, grpc) = checked_through_an_outage(Duration::ZERO).await;
    assert_eq!(http.status, 503, "{:?}", http.body);
    assert_eq!(
        grpc.expect_err("the outage").code(),
        tonic::Code::Unavailable
    );
}
