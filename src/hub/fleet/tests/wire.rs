//! What one replica's entries mean to another: every outcome the hub
//! shares decodes to the same error class and reason (`Error::classify`),
//! and a state keeps the instant it was observed. Messages of replicas
//! without the newer fields still decode.

use std::time::Duration;

use crate::{
    error::Error,
    hub::{
        HubError,
        fleet::wire::{Entry, WireError, now_ms},
        tests::fake::status,
    },
    job::JobState,
    upstream::UpstreamError,
};

/// The service's mapping of a hub error (`service::admission`), so the
/// test compares what callers are told.
fn as_error(e: HubError) -> Error {
    match e {
        HubError::NotFound { mark_id } => Error::NotFound { mark_id },
        HubError::Upstream(source) => Error::Upstream {
            source,
            default_token: false,
        },
        HubError::Outage { budget, last } => Error::UpstreamOutage { budget, last },
        HubError::DeadlineExceeded => Error::DeadlineExceeded(String::new()),
        HubError::Stopped => Error::ShuttingDown,
        HubError::Internal => Error::Internal,
    }
}

/// `outcome` as another replica reads it: encoded, sent as JSON, decoded.
fn across(
    outcome: &Result<crate::job::JobStatus, HubError>,
) -> Result<crate::job::JobStatus, HubError> {
    let json = serde_json::to_string(&Entry::of("job-1", outcome)).expect("encode");
    let entry: Entry = serde_json::from_str(&json).expect("decode");
    entry.outcome()
}

fn upstream_kinds() -> Vec<UpstreamError> {
    let http = |status: u16| UpstreamError::Http {
        status,
        body: "body".into(),
    };
    vec![
        UpstreamError::Unauthorized,
        UpstreamError::Forbidden,
        UpstreamError::RateLimited { retry_after: None },
        UpstreamError::RateLimited {
            retry_after: Some(Duration::from_secs(3)),
        },
        http(503),
        http(408),
        http(400),
        http(404),
        UpstreamError::Build {
            detail: "bad header".into(),
        },
        UpstreamError::Connect {
            detail: "refused".into(),
        },
        UpstreamError::Interrupted {
            detail: "reset".into(),
        },
        UpstreamError::Timeout(Duration::from_secs(30)),
        UpstreamError::Rejected {
            code: 7,
            message: "no credits".into(),
        },
        UpstreamError::Decode {
            error: "expected i64".into(),
            body: "{}".into(),
        },
    ]
}

#[test]
fn every_shared_error_keeps_its_class_and_reason_across_replicas() {
    let mut kinds: Vec<HubError> = upstream_kinds()
        .into_iter()
        .map(HubError::Upstream)
        .collect();
    kinds.extend([
        HubError::NotFound {
            mark_id: "job-1".into(),
        },
        HubError::Internal,
        HubError::Stopped,
        HubError::DeadlineExceeded,
        HubError::Outage {
            budget: Duration::from_secs(60),
            last: UpstreamError::Timeout(Duration::from_secs(30)),
        },
    ]);
    for kind in kinds {
        let there = across(&Err(kind.clone())).expect_err("an error stays an error");
        let (sent, read) = (as_error(kind.clone()), as_error(there.clone()));
        assert_eq!(
            sent.classify(),
            read.classify(),
            "{kind:?} became {there:?}"
        );
        assert_eq!(sent.retry_after(), read.retry_after(), "{kind:?}");
        assert_eq!(
            std::mem::discriminant(&kind),
            std::mem::discriminant(&there),
            "{kind:?} became {there:?}"
        );
    }
}

#[test]
fn a_state_keeps_the_instant_it_was_observed() {
    let mut running = status("job-1", JobState::Running);
    let seen = now_ms();
    running.observed_at = Some(seen);
    let there = across(&Ok(running.clone())).expect("a state");
    assert_eq!(there, running);
    assert_eq!(there.observed_at, Some(seen), "the same instant, to the ms");
    // From a replica that does not stamp states: no instant.
    running.observed_at = None;
    assert_eq!(across(&Ok(running)).map(|s| s.observed_at), Ok(None));
    let old = r#"{"id":"job-1","status":{"state":"running"}}"#;
    let entry: Entry = serde_json::from_str(old).expect("an older replica's entry");
    assert_eq!(entry.outcome().map(|s| s.observed_at), Ok(None));
}

#[test]
fn entries_of_older_replicas_decode_and_newer_ones_read_as_before_there() {
    // An older replica's internal error: what it always meant.
    let old = r#"{"id":"job-1","error":{"kind":"other","message":"boom"}}"#;
    let entry: Entry = serde_json::from_str(old).expect("decode");
    assert!(matches!(
        entry.outcome(),
        Err(HubError::Upstream(UpstreamError::Build { .. }))
    ));
    // A newer replica's internal error, read by an older one (which knows
    // `id` and `error` only): still an error it can decode.
    #[derive(serde::Deserialize)]
    struct Older {
        #[allow(dead_code)]
        id: String,
        error: Option<WireError>,
    }
    let json =
        serde_json::to_string(&Entry::of("job-1", &Err(HubError::Internal))).expect("encode");
    let older: Older = serde_json::from_str(&json).expect("older replicas decode it");
    assert!(matches!(older.error, Some(WireError::Other { .. })));
}
