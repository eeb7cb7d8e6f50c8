//! OpenTelemetry tracing end to end: the `serve` binary against the
//! simulator, exporting to a real OTLP receiver on loopback (the
//! collector's `TraceService` over gRPC, or `POST /v1/traces` with
//! protobuf bodies). Calls carry a caller's `traceparent`; the receiver
//! must hold our SERVER span as its child, the CLIENT span of the Piclumen
//! call in the same trace, the hub round linked to the watch, the service
//! name from `OTEL_SERVICE_NAME`, everything flushed by SIGTERM, and never
//! the token.

mod common;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{Process, Sim, bounded, check_request, sim_config, unused_addr};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, KeyValue, any_value},
    trace::v1::{Span, span::SpanKind},
};
use piclumen_grpc::pb::{self, image_service_client::ImageServiceClient};
use prost::Message;
use tokio::net::TcpListener;
use tonic::{
    Request, Response, Status,
    transport::{Channel, server::TcpIncoming},
};

/// A token that must appear in no exported span.
const SECRET_TOKEN: &str = "sk-tracing-secret-0123456789";
/// The service name the tests give through `OTEL_SERVICE_NAME`.
const SERVICE: &str = "piclumen-tracing-test";

/// One exported span with its resource's attributes.
#[derive(Debug, Clone)]
struct Exported {
    resource: Vec<KeyValue>,
    span: Span,
}

/// What a receiver got, as the requests arrived.
#[derive(Debug, Clone, Default)]
struct Received(Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

impl Received {
    fn push(&self, request: ExportTraceServiceRequest) {
        self.0.lock().expect("received").push(request);
    }

    fn spans(&self) -> Vec<Exported> {
        let requests = self.0.lock().expect("received").clone();
        let mut out = Vec::new();
        for request in requests {
            for rs in request.resource_spans {
                let resource = rs.resource.map(|r| r.attributes).unwrap_or_default();
                for ss in rs.scope_spans {
                    for span in ss.spans {
                        out.push(Exported {
                            resource: resource.clone(),
                            span,
                        });
                    }
                }
            }
        }
        out
    }

    fn raw(&self) -> Vec<ExportTraceServiceRequest> {
        self.0.lock().expect("received").clone()
    }
}

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        self.push(request.into_inner());
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

/// An OTLP/gRPC receiver on a loopback port; its URL and what it gets.
async fn grpc_receiver() -> (String, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let received = Received::default();
    let service = TraceServiceServer::new(received.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    (format!("http://{addr}"), received)
}

/// An OTLP/HTTP receiver (`POST /v1/traces`, protobuf) on a loopback port.
async fn http_receiver() -> (String, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let received = Received::default();
    let kept = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let kept = kept.clone();
            async move {
                match ExportTraceServiceRequest::decode(body) {
                    Ok(request) => {
                        kept.push(request);
                        (
                            axum::http::StatusCode::OK,
                            ExportTraceServiceResponse::default().encode_to_vec(),
                        )
                    }
                    Err(_) => (axum::http::StatusCode::BAD_REQUEST, Vec::new()),
                }
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), received)
}

/// A caller's trace: ids it sends in `traceparent`.
struct Caller {
    trace_id: String,
    span_id: String,
}

impl Caller {
    fn new() -> Self {
        Self {
            trace_id: format!("{:032x}", rand::random::<u128>() | 1),
            span_id: format!("{:016x}", rand::random::<u64>() | 1),
        }
    }

    /// `message` with this caller's `traceparent` and the secret token.
    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = common::authed(SECRET_TOKEN, message);
        let metadata = request.metadata_mut();
        metadata.insert(
            "traceparent",
            format!("00-{}-{}-01", self.trace_id, self.span_id)
                .parse()
                .expect("traceparent"),
        );
        metadata.insert("tracestate", "caller=1".parse().expect("tracestate"));
        request
    }

    /// GenerateImage of `message` as this caller; the new job's mark id.
    async fn generate(
        &self,
        client: &mut ImageServiceClient<Channel>,
        message: pb::GenerateImageRequest,
    ) -> String {
        bounded(
            "GenerateImage",
            client.generate_image(self.request(message)),
        )
        .await
        .expect("generate")
        .into_inner()
        .mark_id
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attr<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn string_attr<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a str> {
    match attr(attributes, key) {
        Some(any_value::Value::StringValue(s)) => Some(s),
        _ => None,
    }
}

fn int_attr(attributes: &[KeyValue], key: &str) -> Option<i64> {
    match attr(attributes, key) {
        Some(any_value::Value::IntValue(i)) => Some(*i),
        _ => None,
    }
}

/// Every string anywhere in a value, for the secret check.
fn strings(value: &AnyValue, out: &mut Vec<String>) {
    match &value.value {
        Some(any_value::Value::StringValue(s)) => out.push(s.clone()),
        Some(any_value::Value::ArrayValue(a)) => a.values.iter().for_each(|v| strings(v, out)),
        Some(any_value::Value::KvlistValue(l)) => l
            .values
            .iter()
            .filter_map(|kv| kv.value.as_ref())
            .for_each(|v| strings(v, out)),
        Some(any_value::Value::BytesValue(b)) => out.push(String::from_utf8_lossy(b).into_owned()),
        _ => {}
    }
}

/// Asserts no exported name, attribute, event or link holds the token.
fn assert_no_secret(received: &Received) {
    let mut texts = Vec::new();
    for exported in received.spans() {
        let span = &exported.span;
        texts.push(span.name.clone());
        let mut attributes: Vec<&KeyValue> = span.attributes.iter().collect();
        for event in &span.events {
            texts.push(event.name.clone());
            attributes.extend(&event.attributes);
        }
        for link in &span.links {
            attributes.extend(&link.attributes);
            texts.push(link.trace_state.clone());
        }
        attributes.extend(&exported.resource);
        for kv in attributes {
            texts.push(kv.key.clone());
            if let Some(value) = &kv.value {
                strings(value, &mut texts);
            }
        }
    }
    assert!(!texts.is_empty());
    for text in texts {
        assert!(!text.contains(SECRET_TOKEN), "token exported in {text:?}");
        assert!(
            !text.contains("sk-tracing-secret"),
            "token exported in {text:?}"
        );
    }
}

/// Starts `serve` against `sim`, exporting to `endpoint` with `protocol`.
/// Nothing is exported before shutdown (a one-minute batch delay), so what
/// the receiver holds after SIGTERM is what the flush sent.
fn serve(sim: &Sim, endpoint: &str, protocol: &str, extra: &[&str]) -> Process {
    let args = [&["--poll-interval", "250ms"][..], extra].concat();
    Process::serve_against(
        &sim.url(),
        &args,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
            ("OTEL_SERVICE_NAME", SERVICE),
            ("OTEL_BSP_SCHEDULE_DELAY", "60000"),
            ("OTEL_TRACES_SAMPLER", "parentbased_always_on"),
        ],
    )
}

/// Sends SIGTERM and waits (bounded) for the process to exit.
async fn terminate(served: &mut Process) {
    served.terminate();
    for _ in 0..300 {
        if let Some(status) = served.try_exit() {
            assert!(status.success(), "serve exited with {status}");
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("serve did not exit within 15 s of SIGTERM");
}

/// One line per span, for failure messages.
fn summary(spans: &[Exported]) -> String {
    spans
        .iter()
        .map(|e| {
            let s = &e.span;
            let attributes: Vec<String> = s
                .attributes
                .iter()
                .map(|kv| {
                    format!(
                        "{}={:?}",
                        kv.key,
                        kv.value.as_ref().and_then(|v| v.value.as_ref())
                    )
                })
                .collect();
            format!(
                "{} kind={} trace={} span={} parent={} links={} [{}]",
                s.name,
                s.kind,
                hex(&s.trace_id),
                hex(&s.span_id),
                hex(&s.parent_span_id),
                s.links.len(),
                attributes.join(", ")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The one SERVER span of `rpc` in the caller's trace.
fn server_span<'a>(spans: &'a [Exported], caller: &Caller, rpc: &str) -> &'a Exported {
    let found: Vec<&Exported> = spans
        .iter()
        .filter(|e| {
            e.span.kind == SpanKind::Server as i32
                && hex(&e.span.trace_id) == caller.trace_id
                && string_attr(&e.span.attributes, "rpc.method") == Some(rpc)
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one {rpc} SERVER span in trace {}:\n{}",
        caller.trace_id,
        summary(spans)
    );
    found[0]
}

/// Asserts a SERVER span is the caller's child with the RPC conventions.
fn assert_server_span(exported: &Exported, caller: &Caller, rpc: &str, mark_id: &str) {
    let span = &exported.span;
    assert_eq!(hex(&span.parent_span_id), caller.span_id, "parent of {rpc}");
    assert_eq!(span.name, format!("piclumen.v1.ImageService/{rpc}"));
    assert_eq!(span.trace_state, "caller=1", "tracestate of {rpc}");
    let a = &span.attributes;
    assert_eq!(string_attr(a, "rpc.system"), Some("grpc"));
    assert_eq!(
        string_attr(a, "rpc.service"),
        Some("piclumen.v1.ImageService")
    );
    assert_eq!(
        int_attr(a, "rpc.grpc.status_code"),
        Some(0),
        "{rpc} ended OK"
    );
    assert_eq!(string_attr(a, "piclumen.mark_id"), Some(mark_id));
    assert_eq!(
        string_attr(a, "piclumen.request_id").map(str::len),
        Some(32),
        "the generated x-request-id"
    );
    assert_eq!(
        string_attr(&exported.resource, "service.name"),
        Some(SERVICE),
        "resource of {rpc}"
    );
}

/// The CLIENT spans of Piclumen calls to `path` in `trace_id`.
fn client_spans<'a>(spans: &'a [Exported], trace_id: &str, path: &str) -> Vec<&'a Span> {
    spans
        .iter()
        .map(|e| &e.span)
        .filter(|s| {
            s.kind == SpanKind::Client as i32
                && hex(&s.trace_id) == trace_id
                && string_attr(&s.attributes, "url.path") == Some(path)
        })
        .collect()
}

fn assert_client_span(span: &Span) {
    let a = &span.attributes;
    assert_eq!(
        span.name,
        format!("POST {}", string_attr(a, "url.path").unwrap_or("?"))
    );
    assert_eq!(string_attr(a, "http.request.method"), Some("POST"));
    assert_eq!(int_attr(a, "http.response.status_code"), Some(200));
    assert_eq!(string_attr(a, "server.address"), Some("127.0.0.1"));
}

/// The ancestors of `span` within the export, nearest first.
fn ancestors<'a>(spans: &'a [Exported], span: &Span) -> Vec<&'a Span> {
    let by_id: HashMap<String, &Span> = spans
        .iter()
        .map(|e| (hex(&e.span.span_id), &e.span))
        .collect();
    let mut out = Vec::new();
    let mut parent = hex(&span.parent_span_id);
    while let Some(next) = by_id.get(&parent) {
        out.push(*next);
        parent = hex(&next.parent_span_id);
        assert!(out.len() < 16, "parent cycle");
    }
    out
}

#[tokio::test]
async fn generate_check_and_watch_join_the_callers_traces_over_grpc() {
    let sim = Sim::start(sim_config()).await;
    let (endpoint, received) = grpc_receiver().await;
    let mut served = serve(&sim, &endpoint, "grpc", &["--log-format", "json"]);
    let mut client = served.client().await;

    let generate = Caller::new();
    let request = pb::GenerateImageRequest {
        prompt: "a lighthouse".into(),
        request_id: "trace-request-1".into(),
        ..Default::default()
    };
    let mark_id = generate.generate(&mut client, request).await;

    let check = Caller::new();
    let request = check.request(check_request(mark_id.clone()));
    bounded("CheckImage", client.check_image(request))
        .await
        .expect("check");

    let watch = Caller::new();
    let request = watch.request(pb::WatchImageRequest {
        mark_id: mark_id.clone(),
    });
    let mut stream = bounded("WatchImage", client.watch_image(request))
        .await
        .expect("watch")
        .into_inner();
    let end = common::final_status(&mut stream).await;
    assert!(end.is_none(), "watch ends OK: {end:?}");
    drop(client);

    assert!(
        received.raw().is_empty(),
        "nothing is exported before the batch delay or shutdown"
    );
    terminate(&mut served).await;
    let spans = received.spans();

    // GenerateImage: SERVER child of the caller, CLIENT create call in its
    // trace under it, the request_id store's calls too.
    let server = server_span(&spans, &generate, "GenerateImage");
    assert_server_span(server, &generate, "GenerateImage", &mark_id);
    let creates = client_spans(&spans, &generate.trace_id, "/api/gen/create");
    assert_eq!(creates.len(), 1, "one create call in the trace");
    assert_client_span(creates[0]);
    assert!(
        ancestors(&spans, creates[0])
            .iter()
            .any(|s| s.span_id == server.span.span_id),
        "the create call is under GenerateImage's SERVER span"
    );
    let store: Vec<&Span> = spans
        .iter()
        .map(|e| &e.span)
        .filter(|s| {
            hex(&s.trace_id) == generate.trace_id
                && string_attr(&s.attributes, "db.system.name") == Some("memory")
        })
        .collect();
    let operations: Vec<&str> = store
        .iter()
        .filter_map(|s| string_attr(&s.attributes, "db.operation.name"))
        .collect();
    for operation in ["get", "claim", "settle"] {
        assert!(
            operations.contains(&operation),
            "store {operation} span: {operations:?}"
        );
    }

    // CheckImage: SERVER child of the caller; the status call that answered
    // it in the same trace, under the hub round it rode.
    let server = server_span(&spans, &check, "CheckImage");
    assert_server_span(server, &check, "CheckImage", &mark_id);
    let statuses = client_spans(&spans, &check.trace_id, "/api/task/batch-process-task");
    assert_eq!(statuses.len(), 1, "one status call in the check's trace");
    assert_client_span(statuses[0]);
    let chain = ancestors(&spans, statuses[0]);
    assert_eq!(chain.first().map(|s| s.name.as_str()), Some("hub round"));
    assert!(
        chain.iter().any(|s| s.span_id == server.span.span_id),
        "the status call is under CheckImage's SERVER span"
    );

    // WatchImage: SERVER child of the caller, rounds linked to it.
    let server = server_span(&spans, &watch, "WatchImage");
    assert_server_span(server, &watch, "WatchImage", &mark_id);
    let linked: Vec<&Span> = spans
        .iter()
        .map(|e| &e.span)
        .filter(|s| {
            s.name == "hub round"
                && s.links
                    .iter()
                    .any(|l| l.span_id == server.span.span_id && hex(&l.trace_id) == watch.trace_id)
        })
        .collect();
    assert!(!linked.is_empty(), "a hub round links the watch");
    for round in &linked {
        assert_ne!(
            hex(&round.trace_id),
            watch.trace_id,
            "rounds are traces of their own"
        );
        assert!(
            string_attr(&round.attributes, "piclumen.mark_ids")
                .is_some_and(|ids| ids.split(',').any(|id| id == mark_id))
        );
    }

    // Every span ended and was sent: each one's parent is the caller's or
    // exported too.
    for exported in &spans {
        let span = &exported.span;
        assert!(span.end_time_unix_nano >= span.start_time_unix_nano);
        let parent = hex(&span.parent_span_id);
        let callers = [&generate.span_id, &check.span_id, &watch.span_id];
        assert!(
            span.parent_span_id.is_empty()
                || callers.contains(&&parent)
                || spans.iter().any(|e| hex(&e.span.span_id) == parent),
            "parent {parent} of {} was not exported",
            span.name
        );
    }
    assert_no_secret(&received);

    // The JSON log lines of the calls carry their trace and span ids.
    let log = served.log();
    let generated = log
        .iter()
        .filter(|l| l.contains("generation started"))
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON line"))
        .next()
        .expect("the generation's log line");
    assert_eq!(generated["trace_id"], generate.trace_id.as_str());
    assert_eq!(
        generated["span_id"],
        hex(&server_span(&spans, &generate, "GenerateImage").span.span_id).as_str()
    );
    assert!(log.iter().any(|l| l.contains("spans flushed")), "{log:#?}");
    assert!(!log.iter().any(|l| l.contains(SECRET_TOKEN)));
}

#[tokio::test]
async fn http_protobuf_export_and_the_http_api_join_the_callers_trace() {
    let sim = Sim::start(sim_config()).await;
    let (endpoint, received) = http_receiver().await;
    let http = unused_addr();
    let http_arg = http.to_string();
    let mut served = serve(
        &sim,
        &endpoint,
        "http/protobuf",
        &["--http-listen", &http_arg],
    );
    let mut client = served.client().await;

    let generate = Caller::new();
    let request = pb::GenerateImageRequest {
        prompt: "a harbour".into(),
        ..Default::default()
    };
    let mark_id = generate.generate(&mut client, request).await;

    // The first version's HTTP API, token in the query string.
    let caller = Caller::new();
    let reply = bounded(
        "POST /check-image",
        reqwest::Client::new()
            .post(format!(
                "http://{http}/check-image?authorization_token={SECRET_TOKEN}&mark_id={mark_id}"
            ))
            .header(
                "traceparent",
                format!("00-{}-{}-01", caller.trace_id, caller.span_id),
            )
            .send(),
    )
    .await
    .expect("HTTP API");
    let status = reply.status();
    assert!(status.is_success(), "{status:?}");
    // gRPC-Web over HTTP/1.1, as a browser sends it.
    let web = Caller::new();
    let message = check_request(mark_id.clone()).encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend((message.len() as u32).to_be_bytes());
    frame.extend(message);
    let reply = bounded(
        "gRPC-Web CheckImage",
        reqwest::Client::new()
            .post(format!(
                "http://{}/piclumen.v1.ImageService/CheckImage",
                served.addr
            ))
            .header("content-type", "application/grpc-web+proto")
            .header("x-grpc-web", "1")
            .header("authorization", format!("Bearer {SECRET_TOKEN}"))
            .header(
                "traceparent",
                format!("00-{}-{}-01", web.trace_id, web.span_id),
            )
            .header("tracestate", "caller=1")
            .body(frame)
            .send(),
    )
    .await
    .expect("gRPC-Web call");
    assert!(reply.status().is_success());
    drop(client);
    terminate(&mut served).await;

    let spans = received.spans();
    let server = server_span(&spans, &web, "CheckImage");
    assert_server_span(server, &web, "CheckImage", &mark_id);
    let server = server_span(&spans, &generate, "GenerateImage");
    assert_server_span(server, &generate, "GenerateImage", &mark_id);
    let creates = client_spans(&spans, &generate.trace_id, "/api/gen/create");
    assert_eq!(creates.len(), 1);
    assert_client_span(creates[0]);

    let http_spans: Vec<&Span> = spans
        .iter()
        .map(|e| &e.span)
        .filter(|s| s.kind == SpanKind::Server as i32 && hex(&s.trace_id) == caller.trace_id)
        .collect();
    assert_eq!(
        http_spans.len(),
        1,
        "one HTTP SERVER span:\n{}",
        summary(&spans)
    );
    let span = http_spans[0];
    assert_eq!(hex(&span.parent_span_id), caller.span_id);
    assert_eq!(span.name, "POST /check-image");
    let a = &span.attributes;
    assert_eq!(string_attr(a, "http.request.method"), Some("POST"));
    assert_eq!(string_attr(a, "url.path"), Some("/check-image"));
    assert_eq!(string_attr(a, "http.route"), Some("/check-image"));
    assert_eq!(
        int_attr(a, "http.response.status_code"),
        Some(i64::from(status.as_u16()))
    );
    assert_eq!(string_attr(a, "piclumen.mark_id"), Some(mark_id.as_str()));
    assert_eq!(
        client_spans(&spans, &caller.trace_id, "/api/task/batch-process-task").len(),
        1,
        "the check's status call is in the HTTP caller's trace"
    );
    assert_no_secret(&received);
}

#[tokio::test]
async fn an_unreachable_collector_neither_fails_calls_nor_floods_the_log() {
    let sim = Sim::start(sim_config()).await;
    let nowhere = format!("http://{}", unused_addr());
    let mut served = Process::serve_against(
        &sim.url(),
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", nowhere.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ],
    );
    let mut client = served.client().await;
    for i in 0..20 {
        let caller = Caller::new();
        let request = caller.request(pb::GenerateImageRequest {
            prompt: format!("call {i}"),
            ..Default::default()
        });
        bounded("GenerateImage", client.generate_image(request))
            .await
            .expect("calls succeed while the collector is down");
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    let failures = |log: &[String]| {
        log.iter()
            .filter(|l| l.contains("cannot export spans"))
            .count()
    };
    assert!(
        common::eventually(Duration::from_secs(10), || {
            let n = failures(&served.log());
            async move { n >= 1 }
        })
        .await,
        "the failure is logged: {:#?}",
        served.log()
    );
    assert_eq!(
        failures(&served.log()),
        1,
        "logged once: {:#?}",
        served.log()
    );
    drop(client);
    terminate(&mut served).await;
}
