//! Health, reflection (v1 and v1alpha) and the drain on shutdown.

mod common;

use std::time::Duration;

use common::*;
use piclumen_grpc::pb::{self, image_service_client::ImageServiceClient};
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

/// The v1 reflection reply to FileContainingSymbol `symbol`: the files
/// that define it.
async fn files_containing(
    h: &Harness,
    symbol: &str,
) -> tonic_reflection::pb::v1::FileDescriptorResponse {
    use tonic_reflection::pb::v1::{
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let request = MessageRequest::FileContainingSymbol(symbol.into());
    let MessageResponse::FileDescriptorResponse(files) = reflection_v1(h, request).await else {
        panic!("{symbol} should resolve to descriptors");
    };
    files
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
    let file = files_containing(&h, "piclumen.v1.ImageService")
        .await
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
    files_containing(&h, "google.rpc.ErrorInfo").await;
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

/// A refused call during the drain: UNAVAILABLE, with reason `SHUTTING_DOWN`
/// when the service answers it. A call that finds the connection already
/// closed gets the transport's own UNAVAILABLE, which carries no details.
fn assert_refused_for_shutdown(status: &tonic::Status) {
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    if !status.details().is_empty() {
        assert_status(status, Code::Unavailable, "SHUTTING_DOWN");
    }
}

#[tokio::test]
async fn shutdown_drains_unary_calls_ends_watches_and_flips_health() {
    let sim = long_jobs();
    let mut config = server_config();
    // Far beyond the bound below: the server must stop because the drain
    // completed, not because its timeout cut it short.
    config.drain_timeout = Duration::from_secs(120);
    let mut h = Harness::with(sim, config).await;
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
    let (mut watch, _) = open_watch(&mut client, TOKEN, mark_id).await;
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
        let (mut stream, _) = open_watch(&mut c, TOKEN, id).await;
        ending.push(tokio::spawn(async move { final_status(&mut stream).await }));
    }
    // A bounded unary load running through the drain.
    let load: Vec<_> = others
        .iter()
        .map(|c| {
            let mut c = c.clone();
            tokio::spawn(async move {
                let mut answers = Vec::new();
                for _ in 0..200 {
                    let request = authed(TOKEN, check_request("x"));
                    let answer = c.check_image(request).await.map(|_| ());
                    let refused = matches!(&answer, Err(s) if s.code() == Code::Unavailable);
                    answers.push(answer);
                    if refused {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                answers
            })
        })
        .collect();

    // A unary call in flight when the drain starts still completes.
    h.sim
        .script(json!([{"endpoint": "create", "delay_ms": 2000}]))
        .await;
    let mut slow_client = client.clone();
    let in_flight = tokio::spawn(async move {
        slow_client
            .generate_image(authed(TOKEN, generate("slow")))
            .await
    });
    // In flight: the simulator holds it (the delay starts as the fault fires).
    assert!(
        eventually(Duration::from_secs(30), || async {
            h.sim.stat("scripted_faults").await == 1
        })
        .await,
        "the slow GenerateImage never reached the simulator"
    );

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
    for answers in load {
        // NOT_FOUND is the load's normal answer; then UNAVAILABLE once refused.
        for answer in answers.await.expect("join") {
            let status = answer.expect_err("the load asks for an unknown job");
            if status.code() == Code::NotFound {
                assert_status(&status, Code::NotFound, "JOB_NOT_FOUND");
            } else {
                assert_refused_for_shutdown(&status);
            }
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
    // The health watch never ends by itself: close it, so that nothing is
    // left to hold the drain.
    drop(health_watch);
    drop(health);
    let created = in_flight
        .await
        .expect("join")
        .expect("the in-flight call completes");
    assert!(!created.into_inner().mark_id.is_empty());

    // New calls are refused, on the old connection or a new one.
    let refused = client.check_image(authed(TOKEN, check_request("x"))).await;
    assert_refused_for_shutdown(&refused.expect_err("new calls are refused while draining"));

    // Every stream has ended: the drain completes on its own, long before
    // its 120 s timeout.
    let task = &mut h.server.task;
    tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .expect("the drain completes once every call has ended")
        .expect("join")
        .expect("clean exit");
}

/// A call that reaches the service after the drain began (its stream opened
/// before, its message sent after) is answered UNAVAILABLE, `SHUTTING_DOWN`.
#[tokio::test]
async fn a_call_arriving_during_the_drain_gets_shutting_down() {
    use tonic::codegen::http::uri::PathAndQuery;
    let sim = long_jobs();
    let mut h = Harness::with(sim, server_config()).await;
    let mut client = h.client().await;
    let mark_id = start_job(&mut client, TOKEN, "long").await;
    // An open watch keeps the drain going while the late call arrives.
    let (mut watch, _) = open_watch(&mut client, TOKEN, mark_id).await;

    // A CheckImage whose message waits for `send`; `opened` fires when the
    // transport first asks for the message, that is once the stream's
    // headers are on their way.
    let (opened_tx, opened) = tokio::sync::oneshot::channel::<()>();
    let (send, message) = tokio::sync::oneshot::channel::<pb::CheckImageRequest>();
    let body = async_stream::stream! {
        let _ = opened_tx.send(());
        if let Ok(message) = message.await {
            yield message;
        }
    };
    let channel = h.server.channel().await;
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    let late = tokio::spawn(async move {
        grpc.ready().await.expect("ready");
        grpc.client_streaming::<_, _, pb::CheckImageResponse, _>(
            authed(TOKEN, body),
            PathAndQuery::from_static("/piclumen.v1.ImageService/CheckImage"),
            tonic_prost::ProstCodec::default(),
        )
        .await
    });
    bounded("opening the late call", opened)
        .await
        .expect("opened");
    // A call answered on the same connection after it proves the server
    // has read the late call's headers: its stream is open.
    let probe = check_request("probe");
    let status = ImageServiceClient::new(channel)
        .check_image(authed(TOKEN, probe))
        .await
        .expect_err("unknown job");
    assert_status(&status, Code::NotFound, "JOB_NOT_FOUND");

    h.server.shutdown();
    let status = final_status(&mut watch).await.expect("the watch ends");
    assert_status(&status, Code::Unavailable, "SHUTTING_DOWN");
    send.send(check_request("x"))
        .expect("late call still waiting");
    let status = bounded("the late call", late)
        .await
        .expect("join")
        .expect_err("refused");
    assert_status(&status, Code::Unavailable, "SHUTTING_DOWN");
}

/// A stream that never ends cannot hold the process: the drain timeout
/// ends `run`, and only then.
#[tokio::test]
async fn the_drain_timeout_bounds_a_stream_that_never_ends() {
    let mut config = server_config();
    config.drain_timeout = Duration::from_secs(1);
    let mut h = Harness::with(sim_config(), config).await;
    let mut health = HealthClient::new(h.server.channel().await);
    let mut health_watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health watch")
        .into_inner();
    health_watch.message().await.expect("h").expect("h");
    let started = std::time::Instant::now();
    h.server.shutdown();
    let task = &mut h.server.task;
    tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .expect("the drain timeout ends the server")
        .expect("join")
        .expect("a timed-out drain still exits cleanly");
    // The open health watch held the drain: the timeout ended it.
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "stopped after {:?}, before the drain timeout",
        started.elapsed()
    );
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
    assert_status(&status, Code::Unavailable, "SHUTTING_DOWN");
    // The job lives at Piclumen, not in the server: another instance picks
    // it up from its current state.
    let mut other = second.client().await;
    let (messages, end) = collect_watch(&mut other, TOKEN, &mark_id).await;
    end.expect("continues elsewhere");
    assert_eq!(states(&messages).last(), Some(&pb::JobState::Succeeded));
}
