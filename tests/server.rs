//! Health, reflection (v1 and v1alpha) and the drain on shutdown.

mod common;

use std::time::Duration;

use common::*;
use piclumen_grpc::pb;
use serde_json::json;
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

#[tokio::test]
async fn health_reports_serving_for_the_server_and_the_service() {
    let h = Harness::start().await;
    let mut health = HealthClient::new(h.server.channel().await);
    for service in ["", "piclumen.v1.ImageService"] {
        let reply = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health check")
            .into_inner();
        assert_eq!(
            reply.status(),
            ServingStatus::Serving,
            "service {service:?}"
        );
    }
    let status = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .expect_err("unknown service");
    assert_eq!(status.code(), Code::NotFound);
}

async fn reflection_v1(
    h: &Harness,
    request: tonic_reflection::pb::v1::server_reflection_request::MessageRequest,
) -> tonic_reflection::pb::v1::server_reflection_response::MessageResponse {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    };
    let mut client = ServerReflectionClient::new(h.server.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut replies = client
        .server_reflection_info(tokio_stream::once(request))
        .await
        .expect("reflection")
        .into_inner();
    replies
        .message()
        .await
        .expect("reply")
        .expect("message")
        .message_response
        .expect("response")
}

#[tokio::test]
async fn reflection_v1_lists_services_and_serves_commented_descriptors() {
    use prost::Message;
    use tonic_reflection::pb::v1::{
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let h = Harness::start().await;
    let MessageResponse::ListServicesResponse(list) =
        reflection_v1(&h, MessageRequest::ListServices(String::new())).await
    else {
        panic!("expected a service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for name in ["piclumen.v1.ImageService", "grpc.health.v1.Health"] {
        assert!(
            names.iter().any(|n| n == name),
            "{name} missing from {names:?}"
        );
    }
    let MessageResponse::FileDescriptorResponse(files) = reflection_v1(
        &h,
        MessageRequest::FileContainingSymbol("piclumen.v1.ImageService".into()),
    )
    .await
    else {
        panic!("expected descriptors");
    };
    let file = files
        .file_descriptor_proto
        .iter()
        .map(|b| prost_types::FileDescriptorProto::decode(b.as_slice()).expect("descriptor"))
        .find(|f| f.package() == "piclumen.v1")
        .expect("our file");
    let comments = file
        .source_code_info
        .expect("source info kept for describe");
    assert!(comments.location.iter().any(|l| {
        l.leading_comments()
            .contains("WatchImage streams the job's state")
    }));
    // Error details resolve too, so grpcurl can print them.
    let MessageResponse::FileDescriptorResponse(_) = reflection_v1(
        &h,
        MessageRequest::FileContainingSymbol("google.rpc.ErrorInfo".into()),
    )
    .await
    else {
        panic!("google.rpc.ErrorInfo should resolve");
    };
}

#[tokio::test]
async fn reflection_v1alpha_answers_for_older_clients() {
    use tonic_reflection::pb::v1alpha::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let h = Harness::start().await;
    let mut client = ServerReflectionClient::new(h.server.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = client
        .server_reflection_info(tokio_stream::once(request))
        .await
        .expect("v1alpha")
        .into_inner();
    let reply = replies.message().await.expect("reply").expect("message");
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("expected a service list");
    };
    assert!(
        list.service
            .iter()
            .any(|s| s.name == "piclumen.v1.ImageService")
    );
}

#[tokio::test]
async fn shutdown_drains_unary_calls_ends_watches_and_flips_health() {
    let sim = long_jobs();
    let mut h = Harness::with(sim, server_config()).await;
    let mut client = h.client().await;
    let mut health = HealthClient::new(h.server.channel().await);
    let mut health_watch = health
        .watch(HealthCheckRequest {
            service: "piclumen.v1.ImageService".into(),
        })
        .await
        .expect("health watch")
        .into_inner();
    assert_eq!(
        health_watch
            .message()
            .await
            .expect("h")
            .expect("h")
            .status(),
        ServingStatus::Serving
    );

    let mark_id = start_job(&mut client, TOKEN, "long").await;
    let mut watch = client
        .watch_image(authed(TOKEN, pb::WatchImageRequest { mark_id }))
        .await
        .expect("watch")
        .into_inner();
    watch.message().await.expect("first").expect("message");
    // 200 more watches over other connections, each waiting for its end.
    let mut others = Vec::new();
    for i in 0..200 {
        if i % 50 == 0 {
            others.push(h.client().await);
        }
    }
    let mut ending = Vec::new();
    for i in 0..200 {
        let mut c = others[i % others.len()].clone();
        let id = start_job(&mut c, TOKEN, "long").await;
        let mut stream = c
            .watch_image(authed(TOKEN, pb::WatchImageRequest { mark_id: id }))
            .await
            .expect("watch")
            .into_inner();
        stream.message().await.expect("first").expect("message");
        ending.push(tokio::spawn(async move { final_status(&mut stream).await }));
    }
    // A bounded unary load running through the drain.
    let load: Vec<_> = others
        .iter()
        .map(|c| {
            let mut c = c.clone();
            tokio::spawn(async move {
                let mut codes = Vec::new();
                for _ in 0..200 {
                    let request = authed(
                        TOKEN,
                        pb::CheckImageRequest {
                            mark_id: "x".into(),
                        },
                    );
                    let code = c
                        .check_image(request)
                        .await
                        .map_or_else(|s| s.code(), |_| Code::Ok);
                    codes.push(code);
                    if code == Code::Unavailable {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                codes
            })
        })
        .collect();

    // A unary call in flight when the drain starts still completes.
    h.sim
        .script(json!([{"endpoint": "create", "delay_ms": 600}]))
        .await;
    let mut slow_client = client.clone();
    let in_flight = tokio::spawn(async move {
        slow_client
            .generate_image(authed(TOKEN, generate("slow")))
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;

    let started = std::time::Instant::now();
    h.server.shutdown();
    let status = final_status(&mut watch)
        .await
        .expect("the watch must not end OK during shutdown");
    assert_status(&status, Code::Unavailable, "SHUTTING_DOWN");
    for ended in ending {
        let status = ended
            .await
            .expect("join")
            .expect("each watch gets a final status");
        assert_status(&status, Code::Unavailable, "SHUTTING_DOWN");
    }
    for codes in load {
        // NOT_FOUND is the load's normal answer; then UNAVAILABLE once refused.
        for code in codes.await.expect("join") {
            assert!(
                matches!(code, Code::NotFound | Code::Unavailable),
                "{code:?}"
            );
        }
    }
    assert_eq!(
        health_watch
            .message()
            .await
            .expect("h")
            .expect("h")
            .status(),
        ServingStatus::NotServing
    );
    let created = in_flight
        .await
        .expect("join")
        .expect("the in-flight call completes");
    assert!(!created.into_inner().mark_id.is_empty());

    // New calls are refused, on the old connection or a new one.
    let refused = client
        .check_image(authed(
            TOKEN,
            pb::CheckImageRequest {
                mark_id: "x".into(),
            },
        ))
        .await;
    assert!(refused.is_err(), "new calls are refused while draining");

    // The health watch stream never ends by itself: the drain timeout (5 s
    // here) bounds the wait for it.
    let task = &mut h.server.task;
    tokio::time::timeout(Duration::from_secs(8), task)
        .await
        .expect("server stops within the drain bound")
        .expect("join")
        .expect("clean exit");
    assert!(started.elapsed() < Duration::from_secs(7));
}

#[tokio::test]
async fn a_watch_reissued_on_another_instance_continues() {
    let mut sim_settings = sim_config();
    sim_settings.job_duration = Duration::from_millis(2500);
    let sim = common::Sim::start(sim_settings).await;
    let mut first = common::Server::start(server_config(), sim.url()).await;
    let second = common::Server::start(server_config(), sim.url()).await;
    let mut client = first.client().await;
    let mark_id = start_job(&mut client, TOKEN, "moving").await;
    let mut watch = client
        .watch_image(authed(
            TOKEN,
            pb::WatchImageRequest {
                mark_id: mark_id.clone(),
            },
        ))
        .await
        .expect("watch")
        .into_inner();
    watch.message().await.expect("first").expect("message");
    first.shutdown();
    let status = final_status(&mut watch)
        .await
        .expect("the watch must not end OK during shutdown");
    assert_eq!(status.code(), Code::Unavailable);
    // The job lives at Piclumen, not in the server: another instance picks
    // it up from its current state.
    let mut other = second.client().await;
    let (messages, end) = collect_watch(&mut other, TOKEN, &mark_id).await;
    end.expect("continues elsewhere");
    assert_eq!(states(&messages).last(), Some(&pb::JobState::Succeeded));
}
