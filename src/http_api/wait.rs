//! `POST /check-image`'s waiting, in HTTP's words: `Prefer: wait=N`
//! (RFC 7240, N seconds) with `If-None-Match: "<etag>"` is CheckImage's
//! `wait` and `etag` (the same core, the same channel, the same caps); every
//! answer that carries the job's state has its `ETag`, and a wait that was
//! applied says so in `Preference-Applied: wait=N` (N as granted, after
//! `--max-check-wait`). `Prefer: wait` without `If-None-Match` (or with
//! `*`) answers at once, as gRPC's `wait` without `etag` does: the first
//! answer's `ETag` is what the next call sends. The body and status codes
//! are those of an answer without waiting (no 304: the first version's
//! callers read the body).

use std::time::Duration;

use axum::{
    http::{HeaderMap, HeaderName, HeaderValue, header},
    response::Response,
};

use crate::{job::Etag, service::WaitFor};

/// `Preference-Applied` (RFC 7240).
pub(super) const PREFERENCE_APPLIED: HeaderName = HeaderName::from_static("preference-applied");

/// The wait the request asks for: `Prefer: wait=N` and the entity tag of
/// `If-None-Match`, both present and readable; else `None`.
pub(super) fn wait_for(headers: &HeaderMap) -> Option<WaitFor> {
    let wait = prefer_wait(headers)?;
    let etag = if_none_match(headers)?;
    Some(WaitFor { wait, etag })
}

/// The first `wait` preference of the `Prefer` headers, in whole seconds;
/// a malformed one is ignored, as RFC 7240 asks of preferences a server
/// cannot read.
fn prefer_wait(headers: &HeaderMap) -> Option<Duration> {
    let preferences = headers
        .get_all(header::HeaderName::from_static("prefer"))
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','));
    for preference in preferences {
        // Parameters after `;` do not apply to `wait`.
        let token = preference.split(';').next().unwrap_or_default();
        let Some((name, value)) = token.split_once('=') else {
            continue;
        };
        if name.trim().eq_ignore_ascii_case("wait") {
            let value = value.trim().trim_matches('"');
            return value.parse::<u64>().ok().map(Duration::from_secs);
        }
    }
    None
}

/// The first entity tag of `If-None-Match` (weak or strong), unquoted;
/// `None` for `*` or a malformed value.
fn if_none_match(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::IF_NONE_MATCH)?.to_str().ok()?;
    let first = value.split(',').next()?.trim();
    let tag = first.strip_prefix("W/").unwrap_or(first);
    let inner = tag.strip_prefix('"')?.strip_suffix('"')?;
    (!inner.is_empty()).then(|| inner.to_owned())
}

/// `response` with the job's `ETag` and, when a wait was applied, the
/// `Preference-Applied: wait=N` saying how long it could last.
pub(super) fn decorate(mut response: Response, etag: Etag, granted: Option<Duration>) -> Response {
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&format!("\"{etag}\"")) {
        headers.insert(header::ETAG, value);
    }
    if let Some(granted) = granted.filter(|g| !g.is_zero())
        && let Ok(value) = HeaderValue::from_str(&format!("wait={}", granted.as_secs()))
    {
        headers.insert(PREFERENCE_APPLIED, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).expect("value"));
        }
        map
    }

    #[test]
    fn prefer_wait_and_if_none_match_make_a_wait() {
        let asked = wait_for(&headers(&[
            ("prefer", "respond-async, wait=20"),
            ("if-none-match", "\"0123456789abcdef\""),
        ]));
        assert_eq!(
            asked,
            Some(WaitFor {
                wait: Duration::from_secs(20),
                etag: "0123456789abcdef".into()
            })
        );
    }

    #[test]
    fn the_forms_rfc_7240_and_9110_allow_are_read() {
        let read = |prefer: &str, tag: &str| {
            wait_for(&headers(&[("prefer", prefer), ("if-none-match", tag)]))
                .map(|w| (w.wait.as_secs(), w.etag))
        };
        assert_eq!(read("WAIT = 5", "W/\"a\""), Some((5, "a".into())));
        assert_eq!(
            read("wait=\"7\"; x=y", "\"b\", \"c\""),
            Some((7, "b".into()))
        );
        // Malformed, or nothing to compare with: no wait.
        assert_eq!(read("wait=soon", "\"a\""), None);
        assert_eq!(read("wait=-1", "\"a\""), None);
        assert_eq!(read("wait=5", "*"), None);
        assert_eq!(read("wait=5", "a"), None);
        assert_eq!(read("handling=lenient", "\"a\""), None);
        let only_prefer = headers(&[("prefer", "wait=5")]);
        assert_eq!(wait_for(&only_prefer), None);
        let two = headers(&[("prefer", "handling=strict"), ("prefer", "wait=9")]);
        assert_eq!(prefer_wait(&two), Some(Duration::from_secs(9)));
    }

    #[test]
    fn answers_carry_the_quoted_etag_and_the_granted_wait() {
        let status = crate::job::JobStatus {
            mark_id: "m".into(),
            state: crate::job::JobState::Pending,
            queue_position: 1,
            images: Vec::new(),
            upstream_status: "pending".into(),
            prompt_id: String::new(),
            observed_at: None,
        };
        let etag = status.etag();
        let response = decorate(Response::default(), etag, Some(Duration::from_secs(60)));
        let header = |name| response.headers().get(name).and_then(|v| v.to_str().ok());
        assert_eq!(header(header::ETAG), Some(format!("\"{etag}\"").as_str()));
        assert_eq!(header(PREFERENCE_APPLIED), Some("wait=60"));
        let plain = decorate(Response::default(), etag, None);
        assert!(plain.headers().get(PREFERENCE_APPLIED).is_none());
    }
}
