//! GenerateImage end to end: defaults and fields as the simulator receives
//! them, validation, tokens, and request_id idempotency.

mod common;

use std::time::Duration;

use common::*;
use piclumen_grpc::{job::Token, pb};
use prost_types::{Struct, Value as PValue, value::Kind};
use serde_json::json;
use tonic::Code;
use tonic_types::StatusExt;

#[tokio::test]
async fn defaults_reach_upstream_exactly() {
    let h = Harness::start().await;
    let mut client = h.client().await;
    let created = client
        .generate_image(authed(TOKEN, generate("a magical landscape")))
        .await
        .expect("generate")
        .into_inner();
    assert_eq!(created.mark_id.len(), 32);
    assert!(created.seed > 0);

    let creates = h.sim.creates().await;
    let received = &creates[0];
    assert_eq!(
        received["headers"],
        json!({
            "platform": "Web",
            "content-type": "application/json;charset=UTF-8",
            "accept": "application/json",
            "user-agent": concat!("piclumen-grpc/", env!("CARGO_PKG_VERSION")),
            "origin": null,
            "referer": null,
            "authorization": true,
        })
    );
    // Byte for byte what the web app sends (whole numbers as integers): the
    // contract's create body, with this call's seed.
    let mut expected: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/create_body.json")).expect("fixture");
    expected["seed"] = created.seed.into();
    assert_eq!(received["body"], expected);
}

fn style(url: &str, weight: f64) -> Struct {
    let mut s = Struct::default();
    s.fields.insert(
        "img_url".into(),
        PValue {
            kind: Some(Kind::StringValue(url.into())),
        },
    );
    s.fields.insert(
        "style".into(),
        PValue {
            kind: Some(Kind::StringValue("characterRefer".into())),
        },
    );
    s.fields.insert(
        "weight".into(),
        PValue {
            kind: Some(Kind::NumberValue(weight)),
        },
    );
    s
}

#[tokio::test]
async fn every_field_maps_to_its_upstream_name() {
    let h = Harness::start().await;
    let mut client = h.client().await;
    let mut ability = Struct::default();
    ability.fields.insert(
        "anime".into(),
        PValue {
            kind: Some(Kind::BoolValue(true)),
        },
    );
    let request = pb::GenerateImageRequest {
        prompt: "été ☀ 雪".into(),
        negative_prompt: "blurry".into(),
        model_id: "34ec1b5a-8962-4a93-b047-68cec9691dc2".into(),
        resolution: Some(pb::Resolution {
            width: 1024,
            height: 1024,
            batch_size: 4,
        }),
        seed: Some(98_969_239_490),
        steps: Some(25),
        cfg: Some(4.5),
        sampler_name: "dpmpp_2m_sde_gpu".into(),
        scheduler: "karras".into(),
        denoise: Some(0.75),
        hires_fix_denoise: Some(0.0),
        hires_scale: Some(1.5),
        high_pixels: Some(true),
        model_ability: Some(ability),
        pony_tags: None,
        multi_img2img_info: Some(pb::StyleInfo {
            style_list: vec![style("https://x/a.png", 0.9)],
        }),
        img_control_info: None,
        continue_create: Some(true),
        ..Default::default()
    };
    let created = client
        .generate_image(authed(TOKEN, request))
        .await
        .expect("generate")
        .into_inner();
    assert_eq!(created.seed, 98_969_239_490);
    let body = &h.sim.creates().await[0]["body"];
    assert_eq!(
        *body,
        json!({
            "prompt": "été ☀ 雪", "negative_prompt": "blurry",
            "model_id": "34ec1b5a-8962-4a93-b047-68cec9691dc2",
            "resolution": {"width": 1024, "height": 1024, "batch_size": 4},
            "seed": 98_969_239_490_i64, "steps": 25, "cfg": 4.5,
            "sampler_name": "dpmpp_2m_sde_gpu", "scheduler": "karras",
            "denoise": 0.75, "hires_fix_denoise": 0, "hires_scale": 1.5,
            "highPixels": true, "model_ability": {"anime": true}, "ponyTags": {},
            "multi_img2img_info": {"style_list": [{"img_url": "https://x/a.png", "style": "characterRefer", "weight": 0.9}]},
            "img_control_info": {"style_list": []},
            "continueCreate": true
        })
    );
}

#[tokio::test]
async fn unset_seeds_are_fresh_and_random() {
    let h = Harness::start().await;
    let mut client = h.client().await;
    let mut seeds = Vec::new();
    for _ in 0..5 {
        let r = client
            .generate_image(authed(TOKEN, generate("same")))
            .await
            .expect("generate");
        seeds.push(r.into_inner().seed);
    }
    let sent: Vec<i64> = h
        .sim
        .creates()
        .await
        .as_array()
        .expect("array")
        .iter()
        .map(|c| c["body"]["seed"].as_i64().expect("seed"))
        .collect();
    assert_eq!(sent, seeds, "the returned seed is the one sent");
    seeds.sort_unstable();
    seeds.dedup();
    assert_eq!(seeds.len(), 5, "identical requests got distinct seeds");
}

#[tokio::test]
async fn invalid_requests_name_the_field_and_send_nothing() {
    let h = Harness::start().await;
    let mut client = h.client().await;
    let res = |w, hgt, b| {
        Some(pb::Resolution {
            width: w,
            height: hgt,
            batch_size: b,
        })
    };
    let cases: Vec<(pb::GenerateImageRequest, &str)> = vec![
        (generate(""), "prompt"),
        (generate("   "), "prompt"),
        (generate(&"x".repeat(4001)), "prompt"),
        (
            pb::GenerateImageRequest {
                resolution: res(0, 0, 5),
                ..generate("p")
            },
            "resolution.batch_size",
        ),
        (
            pb::GenerateImageRequest {
                resolution: res(0, 0, -1),
                ..generate("p")
            },
            "resolution.batch_size",
        ),
        (
            pb::GenerateImageRequest {
                resolution: res(-5, 0, 0),
                ..generate("p")
            },
            "resolution.width",
        ),
        (
            pb::GenerateImageRequest {
                resolution: res(0, 5000, 0),
                ..generate("p")
            },
            "resolution.height",
        ),
        (
            pb::GenerateImageRequest {
                resolution: res(10, 0, 0),
                ..generate("p")
            },
            "resolution.width",
        ),
        (
            pb::GenerateImageRequest {
                steps: Some(0),
                ..generate("p")
            },
            "steps",
        ),
        (
            pb::GenerateImageRequest {
                cfg: Some(f64::NAN),
                ..generate("p")
            },
            "cfg",
        ),
        (
            pb::GenerateImageRequest {
                denoise: Some(1.5),
                ..generate("p")
            },
            "denoise",
        ),
        (
            pb::GenerateImageRequest {
                seed: Some(-1),
                ..generate("p")
            },
            "seed",
        ),
        (
            pb::GenerateImageRequest {
                request_id: "r".repeat(129),
                ..generate("p")
            },
            "request_id",
        ),
    ];
    for (request, field) in cases {
        let status = client
            .generate_image(authed(TOKEN, request))
            .await
            .expect_err("invalid");
        assert_status(&status, Code::InvalidArgument, "INVALID_REQUEST");
        assert!(
            status.message().starts_with(field),
            "{field}: {}",
            status.message()
        );
        let details = status.get_error_details();
        let violations = &details.bad_request().expect("BadRequest").field_violations;
        assert_eq!(violations[0].field, field);
    }
    assert_eq!(h.sim.stat("create_calls").await, 0);
}

#[tokio::test]
async fn resolution_zero_fields_take_defaults_individually() {
    let h = Harness::start().await;
    let mut client = h.client().await;
    let request = pb::GenerateImageRequest {
        resolution: Some(pb::Resolution {
            width: 512,
            height: 0,
            batch_size: 0,
        }),
        ..generate("p")
    };
    client
        .generate_image(authed(TOKEN, request))
        .await
        .expect("generate");
    let body = &h.sim.creates().await[0]["body"];
    assert_eq!(
        body["resolution"],
        json!({"width": 512, "height": 768, "batch_size": 1})
    );
}

#[tokio::test]
async fn missing_token_is_unauthenticated_before_any_upstream_call() {
    let h = Harness::start().await;
    let mut client = h.client().await;
    let status = client
        .generate_image(generate("p"))
        .await
        .expect_err("no token");
    assert_status(&status, Code::Unauthenticated, "TOKEN_MISSING");
    let mut bad = authed("x", generate("p"));
    bad.metadata_mut()
        .insert("authorization", "Bearer ".parse().expect("ascii"));
    let status = client.generate_image(bad).await.expect_err("empty token");
    assert_status(&status, Code::Unauthenticated, "TOKEN_MALFORMED");
    assert_eq!(h.sim.stat("create_calls").await, 0);
}

#[tokio::test]
async fn bare_token_and_default_token_are_used() {
    let sim = Sim::start(sim_config()).await;
    let mut config = server_config();
    config.service.default_token = Token::new("server-default");
    let server = Server::start(config, sim.url()).await;
    let mut client = server.client().await;
    // No metadata: the default token creates the job...
    let mark_id = client
        .generate_image(generate("p"))
        .await
        .expect("default token")
        .into_inner()
        .mark_id;
    // ...so the same account sees it with the bare token, another does not.
    let mut bare = tonic::Request::new(check_request(mark_id.clone()));
    bare.metadata_mut()
        .insert("authorization", "server-default".parse().expect("ascii"));
    client
        .check_image(bare)
        .await
        .expect("bare token sees its job");
    let status = client
        .check_image(authed(OTHER_TOKEN, check_request(mark_id)))
        .await
        .expect_err("other account");
    assert_eq!(status.code(), Code::NotFound);
}

fn with_id(prompt: &str, id: &str) -> pb::GenerateImageRequest {
    pb::GenerateImageRequest {
        request_id: id.into(),
        ..generate(prompt)
    }
}

#[tokio::test]
async fn request_id_dedupes_per_token() {
    let h = Harness::start().await;
    let mut client = h.client().await;
    let first = client
        .generate_image(authed(TOKEN, with_id("p", "req-1")))
        .await
        .expect("first")
        .into_inner();
    let retry = client
        .generate_image(authed(TOKEN, with_id("p", "req-1")))
        .await
        .expect("retry")
        .into_inner();
    assert_eq!(
        first, retry,
        "a retry returns the first call's mark id and seed"
    );
    assert_eq!(h.sim.stat("create_calls").await, 1);

    // Another account with the same request_id is another generation.
    let other = client
        .generate_image(authed(OTHER_TOKEN, with_id("p", "req-1")))
        .await
        .expect("other")
        .into_inner();
    assert_ne!(other.mark_id, first.mark_id);
    assert_eq!(h.sim.stat("create_calls").await, 2);

    // Same id, different parameters: refused, nothing sent.
    let status = client
        .generate_image(authed(TOKEN, with_id("different", "req-1")))
        .await
        .expect_err("reuse with other params");
    assert_status(&status, Code::InvalidArgument, "INVALID_REQUEST");
    assert!(status.message().starts_with("request_id"));
    assert_eq!(h.sim.stat("create_calls").await, 2);
}

#[tokio::test]
async fn concurrent_calls_with_one_request_id_share_one_create() {
    let mut sim = sim_config();
    sim.latency = Duration::from_millis(300);
    let h = Harness::with(sim, server_config()).await;
    let client = h.client().await;
    let calls = (0..10).map(|_| {
        let mut client = client.clone();
        tokio::spawn(async move {
            client
                .generate_image(authed(TOKEN, with_id("p", "same")))
                .await
        })
    });
    let mut ids = Vec::new();
    for call in calls {
        ids.push(
            call.await
                .expect("join")
                .expect("generate")
                .into_inner()
                .mark_id,
        );
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "all callers share the first outcome");
    assert_eq!(h.sim.stat("create_calls").await, 1);
}

#[tokio::test]
async fn a_failed_create_is_not_remembered() {
    let h = Harness::start().await;
    h.sim
        .script(json!([{"endpoint": "create", "http_status": 503, "body": "busy"}]))
        .await;
    let mut client = h.client().await;
    let status = client
        .generate_image(authed(TOKEN, with_id("p", "r")))
        .await
        .expect_err("503");
    assert_eq!(status.code(), Code::Unavailable);
    let created = client
        .generate_image(authed(TOKEN, with_id("p", "r")))
        .await
        .expect("retry creates");
    assert!(!created.into_inner().mark_id.is_empty());
    assert_eq!(h.sim.stat("create_calls").await, 2);
}

#[tokio::test]
async fn generate_is_never_retried_upstream() {
    let h = Harness::start().await;
    h.sim
        .script(json!([{"endpoint": "create", "http_status": 502, "body": "bad gateway"}]))
        .await;
    let mut client = h.client().await;
    let status = client
        .generate_image(authed(TOKEN, generate("p")))
        .await
        .expect_err("502");
    // A gateway's 502: the create may have started, so the answer is not
    // one a client retries on its own.
    assert_status(&status, Code::Aborted, "CREATE_OUTCOME_UNKNOWN");
    assert_eq!(h.sim.stat("create_calls").await, 1);
}

#[tokio::test]
async fn request_ids_are_forgotten_after_the_window() {
    let sim = Sim::start(sim_config()).await;
    let mut config = server_config();
    config.idempotency.ttl = Duration::from_millis(300);
    let server = Server::start(config, sim.url()).await;
    let mut client = server.client().await;
    let first = client
        .generate_image(authed(TOKEN, with_id("p", "w")))
        .await
        .expect("first")
        .into_inner();
    let again = client
        .generate_image(authed(TOKEN, with_id("p", "w")))
        .await
        .expect("within")
        .into_inner();
    assert_eq!(first, again);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = client
        .generate_image(authed(TOKEN, with_id("p", "w")))
        .await
        .expect("after")
        .into_inner();
    assert_ne!(
        later.mark_id, first.mark_id,
        "after the window a request_id starts a new job"
    );
    assert_eq!(sim.stat("create_calls").await, 2);
}

#[tokio::test]
async fn creates_reuse_upstream_connections_beyond_64_in_flight() {
    const IN_FLIGHT: usize = 128;
    const WAVES: usize = 4;
    let mut sim = sim_config();
    // Long enough that every create of a wave is in flight at once.
    sim.latency = Duration::from_millis(100);
    let mut config = server_config();
    config.service.max_generates_per_token = IN_FLIGHT;
    let h = Harness::with(sim, config).await;
    let client = h.client().await;
    for wave in 0..WAVES {
        let calls: Vec<_> = (0..IN_FLIGHT)
            .map(|i| {
                let mut client = client.clone();
                tokio::spawn(async move {
                    client
                        .generate_image(authed(TOKEN, generate(&format!("wave {wave} call {i}"))))
                        .await
                })
            })
            .collect();
        for call in calls {
            bounded("a create", call)
                .await
                .expect("join")
                .expect("generate");
        }
        // Let the last replies hand their connections back to the pool.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(h.sim.stat("create_calls").await, (IN_FLIGHT * WAVES) as u64);
    // Each wave finds the previous wave's connections idle: the first wave
    // opens at most one per create and later waves reuse them, where a cap
    // on idle connections below the peak would reopen the excess each wave.
    let connections = h.sim.stat("connections").await;
    assert!(
        connections <= (IN_FLIGHT + IN_FLIGHT / 4) as u64,
        "{connections} upstream connections for {WAVES} waves of {IN_FLIGHT} creates"
    );
}
