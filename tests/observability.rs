//! What operators see: `x-request-id` on responses and log lines, and no
//! token anywhere in logs (debug level, JSON and text) or errors.

mod common;

use std::{
    io::Write,
    sync::{Arc, Mutex, OnceLock},
};

use common::*;
use piclumen_grpc::{job::Token, pb};
use serde_json::json;
use tonic::Code;
use tracing_subscriber::{
    EnvFilter, fmt::MakeWriter, layer::SubscriberExt, util::SubscriberInitExt,
};

/// Everything logged by this test binary, JSON and text lines alike.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

fn logs() -> &'static Captured {
    static LOGS: OnceLock<Captured> = OnceLock::new();
    LOGS.get_or_init(|| {
        let captured = Captured::default();
        tracing_subscriber::registry()
            .with(EnvFilter::new("debug"))
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(captured.clone()),
            )
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(captured.clone()),
            )
            .init();
        captured
    })
}

fn log_text() -> String {
    String::from_utf8_lossy(&logs().0.lock().expect("log buffer")).into_owned()
}

#[tokio::test]
async fn request_id_is_echoed_and_logged() {
    logs();
    let h = Harness::start().await;
    let mut client = h.client().await;
    let mut request = authed(TOKEN, generate("p"));
    request
        .metadata_mut()
        .insert("x-request-id", "req-echo-4711".parse().expect("ascii"));
    let response = client.generate_image(request).await.expect("generate");
    assert_eq!(
        response.metadata().get("x-request-id").expect("echoed"),
        "req-echo-4711"
    );
    let mark_id = response.into_inner().mark_id;

    // Streams echo it too, and their log lines carry it.
    let mut request = authed(
        TOKEN,
        pb::WatchImageRequest {
            mark_id: mark_id.clone(),
        },
    );
    request
        .metadata_mut()
        .insert("x-request-id", "req-watch-4712".parse().expect("ascii"));
    let response = client.watch_image(request).await.expect("watch");
    assert_eq!(
        response.metadata().get("x-request-id").expect("echoed"),
        "req-watch-4712"
    );
    let mut stream = response.into_inner();
    while stream.message().await.expect("stream").is_some() {}

    // Absent: one is generated.
    let response = client
        .check_image(authed(TOKEN, pb::CheckImageRequest { mark_id }))
        .await
        .expect("check");
    let generated = response
        .metadata()
        .get("x-request-id")
        .expect("generated")
        .to_str()
        .expect("ascii");
    assert_eq!(generated.len(), 32);

    // Errors carry it in their metadata as well.
    let mut request = authed(TOKEN, generate(""));
    request
        .metadata_mut()
        .insert("x-request-id", "req-error-4713".parse().expect("ascii"));
    let status = client.generate_image(request).await.expect_err("invalid");
    assert_eq!(
        status.metadata().get("x-request-id").expect("echoed"),
        "req-error-4713"
    );

    let text = log_text();
    let line_with =
        |needle: &str, id: &str| text.lines().any(|l| l.contains(needle) && l.contains(id));
    assert!(
        line_with("generation started", "req-echo-4711"),
        "generate log lacks its id"
    );
    assert!(
        line_with("watch finished", "req-watch-4712"),
        "stream log lacks its id"
    );
}

#[tokio::test]
async fn no_token_reaches_logs_or_errors() {
    logs();
    const GOOD: &str = "canary-good-7f3a91";
    const BAD: &str = "canary-bad-91c2d4";
    const DEFAULT: &str = "canary-default-55e1b0";
    let mut sim = sim_config();
    sim.tokens = vec![GOOD.into()];
    let sim = Sim::start(sim).await;
    let mut config = server_config();
    config.service.default_token = Token::new(DEFAULT);
    let server = Server::start(config, sim.url()).await;
    let mut client = server.client().await;
    let mut errors = Vec::new();

    let mark_id = start_job(&mut client, GOOD, "p").await;
    let (_, end) = collect_watch(&mut client, GOOD, &mark_id).await;
    end.expect("good watch");
    let dedupe = pb::GenerateImageRequest {
        request_id: "r1".into(),
        ..generate("p")
    };
    client
        .generate_image(authed(GOOD, dedupe.clone()))
        .await
        .expect("first");
    client
        .generate_image(authed(GOOD, dedupe))
        .await
        .expect("retry");
    errors.push(
        client
            .generate_image(authed(BAD, generate("p")))
            .await
            .expect_err("bad token"),
    );
    errors.push(
        client
            .generate_image(generate("p"))
            .await
            .expect_err("default token rejected"),
    );
    errors.push(
        client
            .check_image(authed(
                BAD,
                pb::CheckImageRequest {
                    mark_id: mark_id.clone(),
                },
            ))
            .await
            .expect_err("bad token check"),
    );
    errors.push(
        collect_watch(&mut client, BAD, &mark_id)
            .await
            .1
            .expect_err("bad token watch"),
    );
    sim.script(json!([{"http_status": 429, "body": "{}", "headers": {"Retry-After": "1"}}]))
        .await;
    errors.push(
        client
            .generate_image(authed(GOOD, generate("p")))
            .await
            .expect_err("429"),
    );
    assert_eq!(errors[1].code(), Code::Internal);

    let text = log_text();
    assert!(
        text.contains("Piclumen rejected the server's default token"),
        "operator error log missing"
    );
    for token in [GOOD, BAD, DEFAULT] {
        assert!(!text.contains(token), "token {token} found in the logs");
        for status in &errors {
            assert!(
                !format!("{status:?}").contains(token),
                "token in {status:?}"
            );
            assert!(!String::from_utf8_lossy(status.details()).contains(token));
        }
    }
}
