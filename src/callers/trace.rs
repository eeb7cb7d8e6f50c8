//! The caller's name on the call: the `caller` field of the call's span
//! (`request_id`'s, so every log line of the call carries it) and the
//! `piclumen.caller` attribute of its exported SERVER span. With export on,
//! the current span is the SERVER span and the call's span its parent, so
//! the parent is found through the registry.

use tracing::{Span, Value, span::Record};
use tracing_subscriber::{Registry, registry::LookupSpan};

/// Records `name` on the current call's spans.
pub fn record_caller(name: &str) {
    let span = Span::current();
    span.record("caller", name);
    if !crate::otel::enabled() {
        return;
    }
    span.record("piclumen.caller", name);
    span.with_subscriber(|(id, dispatch)| {
        let Some(registry) = dispatch.downcast_ref::<Registry>() else {
            return;
        };
        let Some(parent) = registry.span(id).and_then(|s| s.parent()) else {
            return;
        };
        let fields = parent.metadata().fields();
        if let Some(field) = fields.field("caller") {
            let values = [(&field, Some(&name as &dyn Value))];
            dispatch.record(&parent.id(), &Record::new(&fields.value_set(&values)));
        }
    });
}
