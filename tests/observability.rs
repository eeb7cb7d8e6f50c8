//! What operators see: `x-request-id` on responses and log lines, no token
//! anywhere in logs (debug level, JSON and text) or errors, and the
//! Prometheus metrics the binary serves.

mod common;

use common::*;
use piclumen_grpc::{job::Token, pb};
use serde_json::json;
use tonic::Code;

/// What the in-process server logs at debug level, as JSON and as text.
fn logs() -> &'static Captured {
    Captured::global("debug", true)
}

fn log_text() -> String {
    logs().text()
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
        .check_image(authed(TOKEN, check_request(mark_id)))
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
    sim.tokens = vec![piclumen_grpc::job::Token::parse(GOOD).expect("token")];
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
            .check_image(authed(BAD, check_request(mark_id.clone())))
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

// === Prometheus metrics, scraped from the binary ===
//
// The metrics recorder is global to a process, so these run the real binary
// (`serve --simulate --metrics-listen`) and count only its calls.

/// `serve ARGS...` as a child process (see `common::process`).
fn serve_binary(args: &[&str]) -> Process {
    Process::serve(args, &[])
}

/// One sample of the Prometheus text format.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: std::collections::BTreeMap<String, String>,
    value: f64,
}

/// Parses the Prometheus text exposition format (comments skipped).
fn parse_prometheus(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample line");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|e| panic!("value in {line:?}: {e}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series, std::collections::BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("closing brace");
                let mut labels = std::collections::BTreeMap::new();
                let mut chars = body.chars().peekable();
                while chars.peek().is_some() {
                    let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
                    assert_eq!(chars.next(), Some('"'), "label value quote in {line:?}");
                    let mut value = String::new();
                    while let Some(c) = chars.next() {
                        match c {
                            '\\' => value.push(chars.next().expect("escaped char")),
                            '"' => break,
                            c => value.push(c),
                        }
                    }
                    if chars.peek() == Some(&',') {
                        chars.next();
                    }
                    labels.insert(key.trim().to_owned(), value);
                }
                (name, labels)
            }
        };
        samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    samples
}

/// The value of the one sample named `name` whose labels include `labels`.
fn sample(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let matching: Vec<&Sample> = samples
        .iter()
        .filter(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect();
    assert_eq!(
        matching.len(),
        1,
        "{name}{labels:?}: expected one sample, found {matching:?}"
    );
    matching[0].value
}

async fn scrape(metrics: std::net::SocketAddr) -> Vec<Sample> {
    let text = reqwest::get(format!("http://{metrics}/metrics"))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("metrics body");
    parse_prometheus(&text)
}

fn rpc<'a>(method: &'a str, kind: &'a str) -> [(&'a str, &'a str); 3] {
    [
        ("grpc_service", "piclumen.v1.ImageService"),
        ("grpc_method", method),
        ("grpc_type", kind),
    ]
}

fn with_code<'a>(labels: [(&'a str, &'a str); 3], code: &'a str) -> Vec<(&'a str, &'a str)> {
    let mut labels = labels.to_vec();
    labels.push(("grpc_code", code));
    labels
}

#[tokio::test]
async fn grpc_metrics_count_calls_by_code_and_time_streams_to_their_end() {
    let metrics = unused_addr();
    let metrics_text = metrics.to_string();
    let served = serve_binary(&[SIMULATE_FAST, &["--metrics-listen", &metrics_text]].concat());
    let mut client =
        pb::image_service_client::ImageServiceClient::connect(format!("http://{}", served.addr))
            .await
            .expect("connect");

    // Before any call every series exists at zero, every code included
    // (as go-grpc-prometheus pre-initialises them). The server registers
    // them just after its "listening" line.
    let generate_rpc = rpc("GenerateImage", "unary");
    assert!(
        eventually(std::time::Duration::from_secs(10), || async {
            scrape(metrics)
                .await
                .iter()
                .any(|s| s.name == "grpc_server_started_total")
        })
        .await,
        "no grpc_server_started_total series"
    );
    let before = scrape(metrics).await;
    assert_eq!(
        sample(
            &before,
            "grpc_server_handled_total",
            &with_code(generate_rpc, "Unauthenticated")
        ),
        0.0
    );
    assert_eq!(
        sample(&before, "grpc_server_started_total", &generate_rpc),
        0.0
    );

    let mark_id = start_job(&mut client, TOKEN, "p").await;
    let invalid = client
        .generate_image(authed(TOKEN, generate("")))
        .await
        .expect_err("empty prompt");
    assert_eq!(invalid.code(), Code::InvalidArgument);
    let missing = client
        .check_image(authed(TOKEN, check_request("no-such-job")))
        .await
        .expect_err("unknown job");
    assert_eq!(missing.code(), Code::NotFound);
    let watch_started = std::time::Instant::now();
    let (messages, end) = collect_watch(&mut client, TOKEN, &mark_id).await;
    let watch_elapsed = watch_started.elapsed().as_secs_f64();
    end.expect("watch ends OK");
    assert_eq!(
        states(&messages).last(),
        Some(&pb::JobState::Succeeded),
        "{messages:?}"
    );

    // A watch the client drops mid-stream counts as Canceled.
    let other = start_job(&mut client, TOKEN, "q").await;
    let mut stream = client
        .watch_image(authed(TOKEN, pb::WatchImageRequest { mark_id: other }))
        .await
        .expect("second watch")
        .into_inner();
    stream.message().await.expect("first update").expect("one");
    drop(stream);

    let watch_rpc = rpc("WatchImage", "server_stream");
    let canceled = with_code(watch_rpc, "Canceled");
    assert!(
        eventually(std::time::Duration::from_secs(10), || async {
            sample(
                &scrape(metrics).await,
                "grpc_server_handled_total",
                &canceled,
            ) == 1.0
        })
        .await,
        "a dropped watch is not counted as Canceled"
    );

    let after = scrape(metrics).await;
    let check_rpc = rpc("CheckImage", "unary");
    let handled = |labels: [(&str, &str); 3], code: &str| {
        sample(
            &after,
            "grpc_server_handled_total",
            &with_code(labels, code),
        )
    };
    assert_eq!(
        sample(&after, "grpc_server_started_total", &generate_rpc),
        3.0
    );
    assert_eq!(handled(generate_rpc, "OK"), 2.0);
    assert_eq!(handled(generate_rpc, "InvalidArgument"), 1.0);
    assert_eq!(handled(check_rpc, "NotFound"), 1.0);
    assert_eq!(handled(check_rpc, "OK"), 0.0);
    assert_eq!(sample(&after, "grpc_server_started_total", &watch_rpc), 2.0);
    assert_eq!(handled(watch_rpc, "OK"), 1.0);
    // Messages, not frames: one per successful unary call, none for an
    // error; every update of the finished watch, and the dropped watch's
    // first update (its second may have left before the drop was seen).
    assert_eq!(
        sample(&after, "grpc_server_msg_sent_total", &generate_rpc),
        2.0
    );
    assert_eq!(
        sample(&after, "grpc_server_msg_sent_total", &check_rpc),
        0.0
    );
    let watch_msgs = sample(&after, "grpc_server_msg_sent_total", &watch_rpc);
    assert!(
        watch_msgs >= messages.len() as f64 + 1.0,
        "{watch_msgs} messages counted, {} received",
        messages.len()
    );

    // A Prometheus histogram (not a summary), with the stream measured to
    // its end rather than to its response headers.
    let count = sample(&after, "grpc_server_handling_seconds_count", &watch_rpc);
    assert_eq!(count, 2.0);
    let sum = sample(&after, "grpc_server_handling_seconds_sum", &watch_rpc);
    assert!(
        sum >= watch_elapsed / 2.0,
        "streams measured {sum} s in all; the finished one alone took {watch_elapsed} s"
    );
    let mut watch_le: Vec<&str> = Vec::new();
    for s in after
        .iter()
        .filter(|s| s.name == "grpc_server_handling_seconds_bucket")
        .filter(|s| s.labels.get("grpc_method").map(String::as_str) == Some("WatchImage"))
    {
        watch_le.push(s.labels.get("le").expect("le label"));
    }
    assert!(
        watch_le.contains(&"+Inf") && watch_le.contains(&"1800"),
        "{watch_le:?}"
    );
    let inf = watch_rpc
        .iter()
        .copied()
        .chain([("le", "+Inf")])
        .collect::<Vec<_>>();
    assert_eq!(
        sample(&after, "grpc_server_handling_seconds_bucket", &inf),
        2.0
    );
    assert!(
        !after
            .iter()
            .any(|s| s.name == "grpc_server_handling_seconds" && s.labels.contains_key("quantile")),
        "the histogram is rendered as a summary"
    );
    assert_eq!(
        sample(&after, "grpc_server_handling_seconds_count", &generate_rpc),
        3.0
    );
}
