//! Log timestamps as `tracing-subscriber`'s `SystemTime` timer writes them
//! (`2026-12-03T15:57:01.606440Z`), built in one buffer by `humantime`
//! instead of seven padded integer writes: every log line pays for it.

use std::time::{SystemTime, UNIX_EPOCH};

use tracing_subscriber::fmt::{format::Writer, time::FormatTime};

/// First second `humantime` cannot write (year 10000).
const YEAR_10000: u64 = 253_402_300_800;

/// UTC, microseconds, `Z`.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Rfc3339Micros;

impl FormatTime for Rfc3339Micros {
    fn format_time(&self, w: &mut Writer<'_>) -> std::fmt::Result {
        let now = SystemTime::now();
        match now.duration_since(UNIX_EPOCH) {
            Ok(since) if since.as_secs() < YEAR_10000 => {
                write!(w, "{}", humantime::format_rfc3339_micros(now))
            }
            // A clock before 1970 or past 9999: the default timer's own
            // notation for those years.
            _ => tracing_subscriber::fmt::time::SystemTime.format_time(w),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(timer: impl FormatTime) -> String {
        let mut out = String::new();
        timer
            .format_time(&mut Writer::new(&mut out))
            .expect("a clock after 1970");
        out
    }

    #[test]
    fn timestamps_read_as_the_default_timer_writes_them() {
        // Fixed-width RFC 3339 sorts as time does: the default timer's
        // reading, taken between two of ours, must sort between them.
        for _ in 0..1000 {
            let before = written(Rfc3339Micros);
            let default = written(tracing_subscriber::fmt::time::SystemTime);
            let after = written(Rfc3339Micros);
            assert_eq!(before.len(), default.len(), "{before} vs {default}");
            assert!(
                before <= default && default <= after,
                "{before} {default} {after}"
            );
            let shape = |s: &str| {
                s.bytes()
                    .map(|b| if b.is_ascii_digit() { b'0' } else { b })
                    .collect::<Vec<_>>()
            };
            assert_eq!(shape(&before), shape(&default));
        }
    }
}
