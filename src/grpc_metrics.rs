//! Per-RPC Prometheus metrics with the names and labels of grpc-go's
//! Prometheus middleware (go-grpc-prometheus), so existing dashboards and
//! alerts work unchanged:
//!
//! - `grpc_server_started_total{grpc_type, grpc_service, grpc_method}`
//! - `grpc_server_handled_total{grpc_type, grpc_service, grpc_method, grpc_code}`
//! - `grpc_server_handling_seconds{grpc_type, grpc_service, grpc_method}` (histogram)
//! - `grpc_server_msg_sent_total{grpc_type, grpc_service, grpc_method}`
//!
//! `grpc_code` is the name Go's `codes.Code.String()` gives (`OK`,
//! `InvalidArgument`, `Canceled`, ...). A call is measured to its end: the
//! response body is wrapped, and the call is recorded when the trailers
//! (`grpc-status`) go out, or at once for a trailers-only response (status in
//! the headers). A call whose response is dropped before its status (the
//! client went away) counts as `Canceled`. `msg_sent` counts the
//! length-prefixed gRPC messages in the response body, not HTTP/2 frames.
//!
//! The method table comes from the descriptor sets of the services the server
//! hosts, and every handle (all codes included, as go-grpc-prometheus
//! pre-initialises them) is created once at startup, so a call costs one map
//! lookup by path and a few atomic increments; no label is built per call.
//! Paths the server does not implement are not counted (their label values
//! would be caller-chosen), as in grpc-go, where unknown methods never reach
//! the interceptors.

use std::{
    collections::HashMap,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use metrics::{Counter, Histogram};
use prost::Message;
use tonic::codegen::http::{Request, Response};
use tower::{Layer, Service};

use crate::call_end::{Observed, ObservedBody, Observer};

/// The histogram's name, for the exporter's bucket configuration.
pub const HANDLING_SECONDS: &str = "grpc_server_handling_seconds";

/// Go's `codes.Code.String()`, indexed by code number.
pub const CODE_NAMES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// The handles of one method.
#[derive(Debug)]
struct MethodMetrics {
    started: Counter,
    msg_sent: Counter,
    handling: Histogram,
    /// One per code, indexed by code number.
    handled: Vec<Counter>,
}

impl MethodMetrics {
    fn register(service: &str, method: &str, kind: &'static str) -> Self {
        let labels = [
            ("grpc_type", kind.to_owned()),
            ("grpc_service", service.to_owned()),
            ("grpc_method", method.to_owned()),
        ];
        let handled = CODE_NAMES
            .iter()
            .map(|code| {
                let mut labels = labels.to_vec();
                labels.push(("grpc_code", (*code).to_owned()));
                metrics::counter!("grpc_server_handled_total", &labels)
            })
            .collect();
        Self {
            started: metrics::counter!("grpc_server_started_total", &labels),
            msg_sent: metrics::counter!("grpc_server_msg_sent_total", &labels),
            handling: metrics::histogram!(HANDLING_SECONDS, &labels),
            handled,
        }
    }
}

/// go-grpc-prometheus's `grpc_type` for a method's streaming shape.
fn rpc_type(client_streaming: bool, server_streaming: bool) -> &'static str {
    match (client_streaming, server_streaming) {
        (false, false) => "unary",
        (true, false) => "client_stream",
        (false, true) => "server_stream",
        (true, true) => "bidi_stream",
    }
}

/// Adds [`GrpcMetrics`] around the server's routes.
#[derive(Debug, Clone)]
pub struct GrpcMetricsLayer {
    /// Request path (`/package.Service/Method`) to its handles.
    methods: Arc<HashMap<String, Arc<MethodMetrics>>>,
}

impl GrpcMetricsLayer {
    /// Registers the metrics of every method of every service described in
    /// `descriptor_sets` (encoded `FileDescriptorSet`s). Call it after the
    /// metrics recorder is installed: handles taken before go nowhere.
    pub fn new(descriptor_sets: &[&[u8]]) -> Result<Self, prost::DecodeError> {
        let mut methods = HashMap::new();
        for encoded in descriptor_sets {
            let set = prost_types::FileDescriptorSet::decode(*encoded)?;
            for file in &set.file {
                for service in &file.service {
                    let full = match file.package() {
                        "" => service.name().to_owned(),
                        package => format!("{package}.{}", service.name()),
                    };
                    for method in &service.method {
                        let kind = rpc_type(method.client_streaming(), method.server_streaming());
                        methods.insert(
                            format!("/{full}/{}", method.name()),
                            Arc::new(MethodMetrics::register(&full, method.name(), kind)),
                        );
                    }
                }
            }
        }
        Ok(Self {
            methods: Arc::new(methods),
        })
    }

    /// The request paths measured, for tests and logs.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.methods.keys().map(String::as_str)
    }
}

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics {
            inner,
            methods: self.methods.clone(),
        }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
    methods: Arc<HashMap<String, Arc<MethodMetrics>>>,
}

impl<S, B, RB> Service<Request<B>> for GrpcMetrics<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
{
    type Response = Response<ObservedBody<RB, Call>>;
    type Error = S::Error;
    type Future = Observed<S::Future, Call>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let call = self.methods.get(request.uri().path()).map(|metrics| {
            metrics.started.increment(1);
            Call {
                metrics: metrics.clone(),
                started: Instant::now(),
                framing: Framing::default(),
            }
        });
        Observed::new(self.inner.call(request), call)
    }
}

/// One measured call: its messages counted as they go out, recorded
/// (handled count and duration) when it ends.
#[derive(Debug)]
pub struct Call {
    metrics: Arc<MethodMetrics>,
    started: Instant,
    framing: Framing,
}

impl Observer for Call {
    fn data(&mut self, data: &Bytes) {
        let messages = self.framing.messages_started(data);
        if messages > 0 {
            self.metrics.msg_sent.increment(messages);
        }
    }

    fn end(self, code: u8) {
        if let Some(counter) = self.metrics.handled.get(usize::from(code)) {
            counter.increment(1);
        }
        self.metrics
            .handling
            .record(self.started.elapsed().as_secs_f64());
    }
}

/// Where the body is in gRPC's framing: each message is a 1-byte flag, a
/// 4-byte big-endian length, then that many bytes; a message may span data
/// frames and a frame may hold several messages.
#[derive(Debug, Default)]
struct Framing {
    /// Prefix bytes of the current message seen so far (0 to 4).
    prefix_seen: u8,
    /// Length being read from the prefix.
    length: u32,
    /// Message bytes still to skip before the next prefix.
    body_left: u64,
}

impl Framing {
    /// Consumes `data` and returns how many messages began in it.
    fn messages_started(&mut self, data: &[u8]) -> u64 {
        let mut started = 0;
        let mut rest = data;
        while !rest.is_empty() {
            if self.body_left > 0 {
                let skip = usize::try_from(self.body_left)
                    .unwrap_or(usize::MAX)
                    .min(rest.len());
                rest = &rest[skip..];
                self.body_left -= skip as u64;
                continue;
            }
            let byte = rest[0];
            rest = &rest[1..];
            if self.prefix_seen > 0 {
                self.length = (self.length << 8) | u32::from(byte);
            }
            self.prefix_seen += 1;
            if self.prefix_seen == 5 {
                started += 1;
                self.body_left = u64::from(self.length);
                self.prefix_seen = 0;
                self.length = 0;
            }
        }
        started
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(len: u32) -> Vec<u8> {
        let mut m = vec![0];
        m.extend_from_slice(&len.to_be_bytes());
        m.extend(std::iter::repeat_n(7, len as usize));
        m
    }

    #[test]
    fn counts_messages_however_the_body_is_cut() {
        let mut body = message(3);
        body.extend(message(0));
        body.extend(message(300));
        body.extend(message(1));
        for cut in 1..body.len() {
            let mut framing = Framing::default();
            let total: u64 = body
                .chunks(cut)
                .map(|chunk| framing.messages_started(chunk))
                .sum();
            assert_eq!(total, 4, "chunks of {cut} bytes");
        }
    }

    #[test]
    fn codes_are_named_as_grpc_go_names_them() {
        assert_eq!(CODE_NAMES[tonic::Code::Ok as usize], "OK");
        assert_eq!(CODE_NAMES[tonic::Code::Cancelled as usize], "Canceled");
        assert_eq!(
            CODE_NAMES[tonic::Code::InvalidArgument as usize],
            "InvalidArgument"
        );
        assert_eq!(
            CODE_NAMES[tonic::Code::Unauthenticated as usize],
            "Unauthenticated"
        );
    }

    #[test]
    fn method_table_covers_the_served_services() {
        let layer = GrpcMetricsLayer::new(&[
            crate::pb::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ])
        .expect("descriptors");
        let mut paths: Vec<_> = layer.paths().collect();
        paths.sort_unstable();
        assert_eq!(
            paths,
            [
                "/grpc.health.v1.Health/Check",
                "/grpc.health.v1.Health/Watch",
                "/piclumen.v1.ImageService/CheckImage",
                "/piclumen.v1.ImageService/GenerateImage",
                "/piclumen.v1.ImageService/WatchImage",
                "/piclumen.v1.ImageService/WatchImages",
            ]
        );
        assert_eq!(rpc_type(false, true), "server_stream");
        assert_eq!(rpc_type(true, true), "bidi_stream");
    }
}
