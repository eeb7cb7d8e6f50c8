//! Text log fields as `tracing-subscriber`'s default formatter writes them,
//! byte for byte, minus its slow path for plain strings: `str`'s `Debug`
//! escapes char by char, which showed up in the profile for the per-call
//! span's two string fields (`request_id`, `method`).

use std::fmt;

use tracing::field::{Field, Visit};
use tracing_subscriber::{
    field::{MakeVisitor, VisitFmt, VisitOutput},
    fmt::format::{DefaultVisitor, Writer},
};

/// [`tracing_subscriber::fmt::format::DefaultFields`], with string fields
/// that need no escaping written whole.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct TextFields;

impl<'a> MakeVisitor<Writer<'a>> for TextFields {
    type Visitor = TextVisitor<'a>;

    fn make_visitor(&self, target: Writer<'a>) -> Self::Visitor {
        TextVisitor(DefaultVisitor::new(target, true))
    }
}

/// Visitor methods that hand their field to the default visitor as is.
macro_rules! forward {
    ($($method:ident: $value:ty),* $(,)?) => {
        $(fn $method(&mut self, field: &Field, value: $value) {
            self.0.$method(field, value);
        })*
    };
}

/// The default visitor; only `record_str` of fields other than the
/// message differs, and only in speed.
#[derive(Debug)]
pub(super) struct TextVisitor<'a>(DefaultVisitor<'a>);

impl Visit for TextVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.record_str(field, value);
        } else {
            self.0.record_debug(field, &Quoted(value));
        }
    }

    forward! {
        record_debug: &dyn fmt::Debug,
        record_error: &(dyn std::error::Error + 'static),
        record_f64: f64,
        record_i64: i64,
        record_u64: u64,
        record_i128: i128,
        record_u128: u128,
        record_bool: bool,
        record_bytes: &[u8],
    }
}

impl VisitOutput<fmt::Result> for TextVisitor<'_> {
    fn finish(self) -> fmt::Result {
        self.0.finish()
    }
}

impl VisitFmt for TextVisitor<'_> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        self.0.writer()
    }
}

/// A string as `str`'s `Debug` writes it: quoted, and escaped when needed.
struct Quoted<'a>(&'a str);

impl fmt::Debug for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Printable ASCII other than `"` and `\` is the one case `Debug`
        // writes unchanged; anything else takes its own path.
        let plain = self
            .0
            .bytes()
            .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\');
        if !plain {
            return fmt::Debug::fmt(self.0, f);
        }
        f.write_str("\"")?;
        f.write_str(self.0)?;
        f.write_str("\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_read_as_str_debug_writes_them() {
        for s in [
            "",
            "plain-id 4711",
            "/piclumen.v1.ImageService/GenerateImage",
            "quote\"inside",
            "back\\slash",
            "tab\tnew\nline\r\0",
            "\u{1b}[31mred",
            "caf\u{e9} \u{301}accent \u{200b}zero-width",
            "\u{7f}del",
        ] {
            assert_eq!(format!("{:?}", Quoted(s)), format!("{s:?}"), "{s:?}");
        }
    }

    /// The lines `emit` logs through the default text format, with the
    /// given field formatter.
    fn lines<N>(fields: N, ansi: bool, emit: fn()) -> String
    where
        N: for<'w> tracing_subscriber::fmt::FormatFields<'w> + Send + Sync + 'static,
    {
        use std::sync::{Arc, Mutex};
        let out = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&out);
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || Sink(Arc::clone(&sink)))
            .without_time()
            .with_ansi(ansi)
            .with_max_level(tracing::Level::TRACE)
            .fmt_fields(fields)
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        let bytes = out.lock().expect("not poisoned").clone();
        String::from_utf8(bytes).expect("UTF-8 log lines")
    }

    struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("not poisoned").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_read_as_the_default_fields_write_them() {
        fn emit() {
            let span = tracing::info_span!(
                "call",
                request_id = "4711-plain",
                method = "/piclumen.v1.ImageService/GenerateImage"
            );
            let _in = span.enter();
            let odd = tracing::info_span!("inner", note = "say \"hi\"\n", empty = "");
            let _odd = odd.enter();
            tracing::info!(mark_id = %"m-1", seed = 42_i64, "generation started");
            tracing::warn!(
                r#type = "raw",
                ok = true,
                ratio = 0.5_f64,
                big = 7_u128,
                "a {} message",
                "formatted"
            );
            let error = std::io::Error::other("upstream \"down\"");
            tracing::error!(error = &error as &(dyn std::error::Error + 'static), id = ?"dbg", "failed");
            tracing::debug!(message = "message\tas a field", plain = "caf\u{e9}");
        }
        for ansi in [false, true] {
            let default = lines(
                tracing_subscriber::fmt::format::DefaultFields::new(),
                ansi,
                emit,
            );
            assert_eq!(default.lines().count(), 4, "{default}");
            assert_eq!(lines(TextFields, ansi, emit), default);
        }
    }
}
