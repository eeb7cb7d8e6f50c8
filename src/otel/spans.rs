//! Spans below the SERVER span: the CLIENT span of each Piclumen call, one
//! per request_id store call, and one per hub round, parented by the first
//! check it answers and linked to the other checks and the watches it
//! feeds, so a CheckImage's trace holds its Piclumen call and a watch's
//! polls are found from its span without one trace per hour of polling.
//! Every function returns at once (or a disabled span) with export off.

use std::{collections::HashMap, sync::Arc, time::Duration};

use opentelemetry::{KeyValue, trace::SpanContext};
use tracing::{Span, field::Empty};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::{TARGET, enabled, propagation};

/// Most span links kept per job and kind: a job watched by thousands must
/// not make every round's span huge.
const MAX_LINKS_PER_JOB: usize = 8;

/// The CLIENT span of one Piclumen HTTP call (`POST path`), a child of the
/// current span. `url.path` is a constant path: never a query, never the
/// base URL (it may hold credentials).
pub fn client_span(method: &'static str, path: &'static str, host: Option<&str>) -> Span {
    if !enabled() {
        return Span::none();
    }
    tracing::info_span!(
        target: TARGET,
        "piclumen call",
        otel.name = format_args!("{method} {path}"),
        otel.kind = "client",
        otel.status_code = Empty,
        http.request.method = method,
        url.path = path,
        server.address = host,
        http.response.status_code = Empty,
        error.type = Empty,
    )
}

/// Records how a Piclumen call ended: its HTTP status, or the kind of
/// failure (`timeout`, `connect`, ...) when no reply came.
/// `outcome` is the HTTP status, or OpenTelemetry's `error.type` of a call
/// that got no reply (`timeout`, `connect`, ...).
pub fn end_client_span(span: &Span, outcome: Result<u16, &'static str>) {
    if span.is_none() {
        return;
    }
    match outcome {
        Ok(status) => {
            span.record("http.response.status_code", i64::from(status));
            if status >= 400 {
                span.record("error.type", status.to_string());
                span.record("otel.status_code", "ERROR");
            }
        }
        Err(error) => {
            span.record("error.type", error);
            span.record("otel.status_code", "ERROR");
        }
    }
}

/// Records a mark id on the current span (the call's SERVER span, when
/// the current span is one).
pub fn record_mark_id(mark_id: &str) {
    if enabled() {
        Span::current().record("piclumen.mark_id", mark_id);
    }
}

/// Records a retry on `span` as an event: the pause before the next try
/// and why.
pub fn retry_event(span: &Span, delay: Duration, error: &str) {
    if span.is_none() {
        return;
    }
    span.add_event(
        "retry",
        vec![
            KeyValue::new("retry.delay_ms", delay.as_millis() as i64),
            KeyValue::new("error.message", error.to_owned()),
        ],
    );
}

/// The span of one request_id store call (`get`, `claim`, `settle`) on
/// `system` (`memory` or `redis`). Keys are hashes and are left out anyway;
/// the store's URL (and its password) never appears.
pub fn store_span(operation: &'static str, system: &'static str) -> Span {
    if !enabled() {
        return Span::none();
    }
    tracing::info_span!(
        target: TARGET,
        "request_id store",
        otel.name = format_args!("{operation} request_id"),
        otel.kind = if system == "redis" { "client" } else { "internal" },
        otel.status_code = Empty,
        db.system.name = system,
        db.operation.name = operation,
        error.type = Empty,
    )
}

/// Marks a store call that failed (the store is unreachable or refused).
pub fn end_store_span(span: &Span, ok: bool) {
    if !ok && !span.is_none() {
        span.record("error.type", "unavailable");
        span.record("otel.status_code", "ERROR");
    }
}

/// The OpenTelemetry span of a call that asked the hub for a job: what a
/// hub round links to.
#[derive(Debug, Clone, Default)]
pub struct Link(Option<SpanContext>);

impl Link {
    /// The current call's span (none with export off), and its mark id
    /// recorded on it.
    pub fn current(mark_id: &str) -> Self {
        if !enabled() {
            return Self(None);
        }
        Span::current().record("piclumen.mark_id", mark_id);
        Self(propagation::current())
    }
}

/// The links of one token's poller: which checks and watches each job's
/// next round serves.
#[derive(Debug, Default)]
pub struct RoundLinks {
    watches: HashMap<Arc<str>, Vec<SpanContext>>,
    checks: HashMap<Arc<str>, Vec<SpanContext>>,
}

impl RoundLinks {
    /// A watch of `id` joined.
    pub fn watch(&mut self, id: &Arc<str>, link: Link) {
        push(&mut self.watches, id, link);
    }

    /// A check of `id` waits for the next round.
    pub fn check(&mut self, id: &Arc<str>, link: Link) {
        push(&mut self.checks, id, link);
    }

    /// Forgets the checks waiting (they were answered without a round).
    pub fn clear_checks(&mut self) {
        self.checks.clear();
    }

    /// The span of a round asking for `ids`: a child of the first check it
    /// answers (or a new trace), linked to the other checks and to the
    /// watches of its ids. Watches of ids no longer `watched` are dropped.
    pub fn round_span(&mut self, ids: &[Arc<str>], watched: impl Fn(&str) -> bool) -> Span {
        if !enabled() {
            return Span::none();
        }
        self.watches.retain(|id, _| watched(id));
        let span = tracing::info_span!(
            target: TARGET,
            parent: None,
            "hub round",
            otel.kind = "internal",
            piclumen.batch_size = ids.len() as i64,
            piclumen.mark_ids = ids.join(",").as_str(),
        );
        let mut checks = ids.iter().filter_map(|id| self.checks.remove(id)).flatten();
        let parent = checks.next();
        let _ = span.set_parent(match &parent {
            Some(sc) => opentelemetry::Context::new().with_remote_span_context(sc.clone()),
            None => opentelemetry::Context::new(),
        });
        for sc in checks {
            span.add_link_with_attributes(sc, vec![KeyValue::new("piclumen.link", "check")]);
        }
        for sc in ids.iter().filter_map(|id| self.watches.get(id)).flatten() {
            span.add_link_with_attributes(
                sc.clone(),
                vec![KeyValue::new("piclumen.link", "watch")],
            );
        }
        span
    }
}

fn push(map: &mut HashMap<Arc<str>, Vec<SpanContext>>, id: &Arc<str>, link: Link) {
    let Some(sc) = link.0 else {
        return;
    };
    let list = map.entry(Arc::clone(id)).or_default();
    if list.len() < MAX_LINKS_PER_JOB {
        list.push(sc);
    }
}

use opentelemetry::trace::TraceContextExt as _;
