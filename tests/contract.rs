//! The Piclumen contract of `shared/UPSTREAM.md`, checked against fixtures
//! kept beside this file: the client decodes its example replies, the
//! server's create body and the simulator's replies carry exactly its field
//! names, and the configurable headers reach Piclumen.

mod common;

use std::time::Duration;

use common::*;
use piclumen_grpc::{
    job::{Image, JobState, JobStatus},
    pb::{self, image_service_client::ImageServiceClient},
    upstream::{decode_create_reply, decode_status_entries},
};
use serde_json::{Value, json};

/// The contract's examples, verbatim (see tests/fixtures/README.md).
const CREATE_BODY: &str = include_str!("fixtures/create_body.json");
const CREATE_REPLY: &str = include_str!("fixtures/create_reply.json");
const STATUS_REPLY: &str = include_str!("fixtures/status_reply.json");

fn fixture(text: &str) -> Value {
    serde_json::from_str(text).expect("fixture is JSON")
}

/// Where `actual` differs from `expected` in shape: object keys (recursively)
/// and the kind of every value. Values themselves are not compared.
fn shape_differences(path: &str, expected: &Value, actual: &Value) -> Vec<String> {
    fn kind(v: &Value) -> &'static str {
        match v {
            Value::Null => "null",
            Value::Bool(_) => "bool",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        }
    }
    let mut out = Vec::new();
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => {
            for key in e.keys().filter(|k| !a.contains_key(*k)) {
                out.push(format!("{path}.{key}: missing"));
            }
            for key in a.keys().filter(|k| !e.contains_key(*k)) {
                out.push(format!("{path}.{key}: not in the contract"));
            }
            for (key, e) in e {
                if let Some(a) = a.get(key) {
                    out.extend(shape_differences(&format!("{path}.{key}"), e, a));
                }
            }
        }
        (Value::Array(e), Value::Array(a)) => {
            // Every element has the shape of the example's first one.
            if let Some(e) = e.first() {
                for (i, a) in a.iter().enumerate() {
                    out.extend(shape_differences(&format!("{path}[{i}]"), e, a));
                }
            }
        }
        (e, a) if kind(e) != kind(a) => {
            out.push(format!("{path}: {} instead of {}", kind(a), kind(e)));
        }
        _ => {}
    }
    out
}

fn assert_same_shape(what: &str, expected: &Value, actual: &Value) {
    let differences = shape_differences("", expected, actual);
    assert!(
        differences.is_empty(),
        "{what} differs from the contract: {differences:#?}\nsent: {actual}"
    );
}

#[test]
fn the_shape_check_sees_a_renamed_nested_or_retyped_field() {
    let contract = fixture(CREATE_BODY);
    let mut renamed = contract.clone();
    let value = renamed["ponyTags"].take();
    renamed.as_object_mut().expect("object").remove("ponyTags");
    renamed["pony_tags"] = value;
    let mut nested = contract.clone();
    nested["resolution"]["batchSize"] = json!(1);
    let mut retyped = contract.clone();
    retyped["seed"] = json!("9896923949");
    assert_eq!(
        shape_differences("", &contract, &renamed),
        [".ponyTags: missing", ".pony_tags: not in the contract"]
    );
    assert_eq!(
        shape_differences("", &contract, &nested),
        [".resolution.batchSize: not in the contract"]
    );
    assert_eq!(
        shape_differences("", &contract, &retyped),
        [".seed: string instead of number"]
    );
    assert!(shape_differences("", &contract, &contract).is_empty());
}

#[test]
fn the_example_create_reply_decodes_to_its_mark_id() {
    assert_eq!(
        decode_create_reply(CREATE_REPLY.as_bytes()).expect("decodes"),
        "7d1f…"
    );
}

/// A status reply through the poller's decoder, every entry readable.
fn decoded_jobs(reply: &str) -> Vec<JobStatus> {
    decode_status_entries(reply.as_bytes())
        .expect("decodes")
        .into_iter()
        .map(|entry| entry.expect("every entry decodes"))
        .collect()
}

#[test]
fn the_example_status_reply_decodes_every_field() {
    let jobs = decoded_jobs(STATUS_REPLY);
    let pending = JobStatus {
        mark_id: "7d1f…".into(),
        state: JobState::Pending,
        queue_position: 3,
        images: Vec::new(),
        upstream_status: "pending".into(),
        prompt_id: String::new(),
        observed_at: None,
    };
    let succeeded = JobStatus {
        mark_id: "a02c…".into(),
        state: JobState::Succeeded,
        queue_position: 0,
        images: vec![Image {
            url: "https://…/x.webp".into(),
            name: "x.webp".into(),
            width: 1344,
            height: 768,
            nsfw: false,
        }],
        upstream_status: "success".into(),
        prompt_id: "…".into(),
        observed_at: None,
    };
    assert_eq!(jobs, [pending, succeeded.clone()]);

    // The same reply with the image flagged.
    let mut flagged = fixture(STATUS_REPLY);
    flagged["data"][1]["img_urls"][0]["sensitive"] = json!("NSFW");
    let jobs = decoded_jobs(&flagged.to_string());
    assert!(jobs[1].images[0].nsfw, "\"NSFW\" marks the image");
    assert_eq!(
        JobStatus {
            images: Vec::new(),
            ..jobs[1].clone()
        },
        JobStatus {
            images: Vec::new(),
            ..succeeded
        }
    );
}

#[tokio::test]
async fn the_create_body_sent_has_the_contract_field_names_and_values() {
    let h = Harness::start().await;
    let mut client = h.client().await;
    let request = pb::GenerateImageRequest {
        seed: Some(9_896_923_949),
        ..generate("a magical landscape")
    };
    client
        .generate_image(authed(TOKEN, request))
        .await
        .expect("generate");
    let creates = h.sim.creates().await;
    let sent = &creates[0]["body"];
    let contract = fixture(CREATE_BODY);
    assert_same_shape("the create body", &contract, sent);
    // With the example's seed, the defaults are the example itself.
    assert_eq!(sent, &contract);
}

#[tokio::test]
async fn the_simulator_replies_with_the_contract_field_names() {
    let sim = Sim::start(sim_config()).await;
    let post = |path: &'static str, body: String| {
        let request = sim
            .http
            .post(format!("{}{path}", sim.url()))
            .header("authorization", TOKEN)
            .header("content-type", "application/json")
            .body(body);
        async move {
            let reply = request.send().await.expect("post");
            assert!(reply.status().is_success(), "{path}: {}", reply.status());
            let bytes = reply.bytes().await.expect("body");
            serde_json::from_slice::<Value>(&bytes).expect("json")
        }
    };
    let created = post("/api/gen/create", CREATE_BODY.to_owned()).await;
    assert_same_shape("the create reply", &fixture(CREATE_REPLY), &created);
    let mark_id = created["data"]["markId"]
        .as_str()
        .expect("markId")
        .to_owned();

    let contract = fixture(STATUS_REPLY);
    let envelope = json!({"status": 0, "message": "", "data": []});
    let body = json!([mark_id]).to_string();
    let mut seen = Vec::new();
    // Pending at once, success after the job's 1.2 s: bounded at 30 s.
    for _ in 0..1500 {
        let reply = post("/api/task/batch-process-task", body.clone()).await;
        assert_same_shape("the status envelope", &envelope, &reply);
        let entry = reply["data"][0].clone();
        let state = entry["status"].as_str().expect("status").to_owned();
        let example = match state.as_str() {
            "pending" => Some(&contract["data"][0]),
            "success" => Some(&contract["data"][1]),
            _ => None,
        };
        if let Some(example) = example {
            assert_same_shape(&format!("a {state} entry"), example, &entry);
        }
        if !seen.contains(&state) {
            seen.push(state.clone());
        }
        if state == "success" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        seen.first().map(String::as_str),
        Some("pending"),
        "{seen:?}"
    );
    assert_eq!(seen.last().map(String::as_str), Some("success"), "{seen:?}");
}

#[tokio::test]
async fn user_agent_origin_and_referer_flags_reach_both_endpoints() {
    let sim = Sim::start(sim_config()).await;
    let upstream = sim.url();
    // Only the flags given here: no setting leaks in from the environment.
    let server = Process::serve(
        &[
            "--listen",
            "127.0.0.1:0",
            "--upstream-url",
            &upstream,
            "--user-agent",
            "Mozilla/5.0 (test agent)",
            "--origin",
            "https://app.example",
            "--referer",
            "https://app.example/create",
        ],
        &[],
    );
    let mut client = ImageServiceClient::connect(format!("http://{}", server.addr))
        .await
        .expect("connect");
    let mark_id = start_job(&mut client, TOKEN, "p").await;
    client
        .check_image(authed(TOKEN, check_request(mark_id)))
        .await
        .expect("check");

    let expected = json!({
        "platform": "Web",
        "content-type": "application/json;charset=UTF-8",
        "accept": "application/json",
        "user-agent": "Mozilla/5.0 (test agent)",
        "origin": "https://app.example",
        "referer": "https://app.example/create",
        "authorization": true,
    });
    assert_eq!(sim.creates().await[0]["headers"], expected);
    let requests = sim_get(&sim, "/_sim/requests").await;
    assert_eq!(requests["create"], expected);
    assert_eq!(requests["status"], expected);
}

#[tokio::test]
async fn without_the_flags_only_the_default_user_agent_is_sent() {
    let h = Harness::start().await;
    let mut client = h.client().await;
    let mark_id = start_job(&mut client, TOKEN, "p").await;
    client
        .check_image(authed(TOKEN, check_request(mark_id)))
        .await
        .expect("check");
    let requests = sim_get(&h.sim, "/_sim/requests").await;
    for endpoint in ["create", "status"] {
        let seen = &requests[endpoint];
        assert_eq!(
            seen["user-agent"],
            concat!("piclumen-grpc/", env!("CARGO_PKG_VERSION")),
            "{endpoint}"
        );
        assert_eq!(seen["origin"], Value::Null, "{endpoint}");
        assert_eq!(seen["referer"], Value::Null, "{endpoint}");
        assert_eq!(seen["authorization"], true, "{endpoint}");
        assert!(
            !seen.to_string().contains(TOKEN),
            "{endpoint}: the token is never recorded: {seen}"
        );
    }
}

/// A simulator JSON page.
async fn sim_get(sim: &Sim, path: &str) -> Value {
    let reply = sim
        .http
        .get(format!("{}{path}", sim.url()))
        .send()
        .await
        .expect("sim get");
    assert!(reply.status().is_success(), "{path}: {}", reply.status());
    let body = reply.bytes().await.expect("sim body");
    serde_json::from_slice(&body).expect("sim json")
}
