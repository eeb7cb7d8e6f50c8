//! The limits on paused time: the clock is anchored at a chosen UTC
//! instant and moves only with `tokio::time::advance`.

use std::{sync::Arc, time::Duration};

use super::*;
use crate::{
    callers::{Caller, CallerGate, Directory},
    error::Error,
    upstream::UpstreamError,
};

/// 2025-03-31T23:59:00Z: a minute before both a day's and a month's turn.
const LAST_MINUTE_OF_MARCH: u64 = 1_743_465_540_000;

fn limits(per_day: Option<u64>, per_minute: Option<u64>) -> Limits {
    Limits {
        images_per_day: per_day,
        creates_per_minute: per_minute,
        max_watches: None,
    }
}

#[test]
fn windows_are_utc_calendar_windows() {
    let w = Windows::at(LAST_MINUTE_OF_MARCH);
    assert_eq!(w.day_label(), "2025-03-31");
    assert_eq!(w.month_label(), "2025-03");
    assert_eq!(w.until_next_day(), Duration::from_secs(60));
    assert_eq!(w.until_next_minute(), Duration::from_secs(60));
    assert_eq!(w.until_next_month(), Duration::from_secs(60));
    let next = Windows::at(LAST_MINUTE_OF_MARCH + 60_000);
    assert_eq!(next.day_label(), "2025-04-01");
    assert_eq!(next.month_label(), "2025-04");
    assert_eq!(Windows::at(0).day_label(), "1970-01-01");
    // A leap day.
    assert_eq!(Windows::at(1_709_164_800_000).day_label(), "2024-02-29");
    assert_eq!(
        Windows::at(1_709_164_800_000).until_next_month(),
        Duration::from_secs(86_400)
    );
}

#[tokio::test(start_paused = true)]
async fn a_day_budget_refuses_until_midnight_then_frees() {
    let clock = Clock::anchored(LAST_MINUTE_OF_MARCH - 3_600_000);
    let counters = MemoryCounters::default();
    let name: Arc<str> = "batch".into();
    let l = limits(Some(10), None);
    for _ in 0..2 {
        counters
            .reserve(&name, &l, 4, clock.now_ms())
            .expect("fits");
    }
    // 8 used: a batch of 4 would pass the limit, one of 2 does not.
    let refused = counters
        .reserve(&name, &l, 4, clock.now_ms())
        .expect_err("over");
    assert_eq!(refused.limit, LimitKind::ImagesPerDay);
    assert_eq!((refused.allowed, refused.used), (10, 8));
    assert_eq!(refused.retry_after, Duration::from_secs(3_660));
    counters
        .reserve(&name, &l, 2, clock.now_ms())
        .expect("fits exactly");
    tokio::time::advance(refused.retry_after).await;
    let taken = counters
        .reserve(&name, &l, 4, clock.now_ms())
        .expect("a new day");
    assert_eq!(taken.windows.day_label(), "2025-04-01");
    assert_eq!(counters.used("batch", clock.now_ms()), (4, 4));
}

#[tokio::test(start_paused = true)]
async fn creates_per_minute_frees_at_the_next_minute() {
    let clock = Clock::anchored(LAST_MINUTE_OF_MARCH + 15_000);
    let counters = MemoryCounters::default();
    let name: Arc<str> = "web".into();
    let l = limits(None, Some(2));
    counters.reserve(&name, &l, 1, clock.now_ms()).expect("1");
    counters.reserve(&name, &l, 1, clock.now_ms()).expect("2");
    let refused = counters
        .reserve(&name, &l, 1, clock.now_ms())
        .expect_err("3");
    assert_eq!(refused.limit, LimitKind::CreatesPerMinute);
    assert_eq!(refused.retry_after, Duration::from_secs(45));
    tokio::time::advance(Duration::from_secs(44)).await;
    assert!(counters.reserve(&name, &l, 1, clock.now_ms()).is_err());
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(counters.reserve(&name, &l, 1, clock.now_ms()).is_ok());
}

#[tokio::test(start_paused = true)]
async fn give_back_returns_to_the_window_it_came_from() {
    let clock = Clock::anchored(LAST_MINUTE_OF_MARCH);
    let counters = MemoryCounters::default();
    let name: Arc<str> = "batch".into();
    let l = limits(Some(4), None);
    let first = counters.reserve(&name, &l, 4, clock.now_ms()).expect("4");
    counters.give_back(&first);
    let again = counters
        .reserve(&name, &l, 4, clock.now_ms())
        .expect("back");
    // The day turns: giving back yesterday's create leaves today alone.
    tokio::time::advance(Duration::from_secs(60)).await;
    counters
        .reserve(&name, &l, 3, clock.now_ms())
        .expect("new day");
    counters.give_back(&again);
    assert_eq!(counters.used("batch", clock.now_ms()), (3, 3));
}

fn gate_with(limits: Limits, clock: Clock) -> (CallerGate, Arc<Caller>) {
    let text = format!(
        "[[caller]]\nname = \"batch\"\nkey_sha256 = \"{}\"\nimages_per_day = {}\n",
        crate::support::hex(&crate::callers::key_hash(b"k")),
        limits.images_per_day.unwrap_or(1000)
    );
    let directory = Arc::new(Directory::parse(&text).expect("file"));
    let caller = Arc::clone(&directory.callers()[0]);
    (CallerGate::new(directory, None, false, clock), caller)
}

#[tokio::test(start_paused = true)]
async fn a_create_that_created_nothing_is_given_back_an_unknown_one_is_kept() {
    let (gate, caller) = gate_with(limits(Some(2), None), Clock::anchored(LAST_MINUTE_OF_MARCH));
    let used = || async { gate.used(&["batch"]).await.expect("used").1[0][0] };
    // Each outcome, and what the caller has used after it.
    let outcomes: [(Result<(), UpstreamError>, u64); 5] = [
        // Could not connect: nothing reached Piclumen.
        (
            Err(UpstreamError::Connect {
                detail: "refused".into(),
            }),
            0,
        ),
        // A definite refusal: nothing was created either.
        (Err(UpstreamError::Unauthorized), 0),
        // Timed out after sending: the job may exist, the image stays.
        (Err(UpstreamError::Timeout(Duration::from_secs(30))), 1),
        // A deadline that passed before sending: nothing was created.
        (Err(UpstreamError::Timeout(Duration::ZERO)), 1),
        (Ok(()), 2),
    ];
    for (outcome, after) in outcomes {
        let taken = gate.charge(&caller, 1).expect("on").take().await;
        taken.expect("within the limit").settle(&outcome);
        assert_eq!(used().await, after, "after {outcome:?}");
    }
    match gate.charge(&caller, 1).expect("on").take().await {
        Err(Error::CallerQuotaExceeded {
            caller,
            limit,
            retry_after,
            ..
        }) => {
            assert_eq!((&*caller, limit), ("batch", "images_per_day"));
            assert_eq!(retry_after, Duration::from_secs(60));
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn watches_are_held_until_dropped() {
    let text = format!(
        "[[caller]]\nname = \"w\"\nkey_sha256 = \"{}\"\nmax_watches = 1\n",
        crate::support::hex(&crate::callers::key_hash(b"k"))
    );
    let directory = Arc::new(Directory::parse(&text).expect("file"));
    let caller = Arc::clone(&directory.callers()[0]);
    let gate = CallerGate::new(directory, None, false, Clock::anchored(0));
    let place = gate.watch(&caller).expect("first");
    assert!(gate.watch(&caller).is_err());
    drop(place);
    assert!(gate.watch(&caller).is_ok());
}

#[test]
fn keys_find_callers_and_unknown_keys_are_refused() {
    let (gate, _) = gate_with(limits(None, None), Clock::System);
    let found = gate.admit(None, Some(b"k"), None).expect("known");
    assert_eq!(found.map(|c| c.name.to_string()).as_deref(), Some("batch"));
    assert_eq!(
        gate.admit(None, Some(b"other"), None).err(),
        Some(Error::ApiKeyInvalid)
    );
    assert_eq!(
        gate.admit(None, None, None).err(),
        Some(Error::ApiKeyMissing)
    );
    // --api-keys-file keeps working beside it: its callers are unnamed.
    let keys = crate::auth::ApiKeys::parse("legacy\n").expect("keys");
    assert!(matches!(
        gate.admit(Some(&keys), Some(b"legacy"), None),
        Ok(None)
    ));
    assert!(
        gate.admit(Some(&keys), Some(b"k"), None)
            .expect("named")
            .is_some()
    );
}

#[test]
fn a_client_certificate_finds_its_caller_by_subject() {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "Example");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "web");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("cert");
    // As `openssl x509 -noout -subject` prints it.
    let text = "[[caller]]\nname = \"web\"\ntls_subject = \"O = Example, CN = web\"\n";
    let directory = Arc::new(Directory::parse(text).expect("file"));
    let gate = CallerGate::new(directory, None, false, Clock::System);
    let found = gate.admit(None, None, Some(cert.der())).expect("known");
    assert_eq!(found.map(|c| c.name.to_string()).as_deref(), Some("web"));
    // Another subject: an unnamed caller the TLS layer verified, as before.
    let mut other = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    other
        .distinguished_name
        .push(rcgen::DnType::CommonName, "other");
    let other = other.self_signed(&key).expect("cert");
    assert!(matches!(
        gate.admit(None, None, Some(other.der())),
        Ok(None)
    ));
}

#[tokio::test]
async fn with_redis_unreachable_only_callers_with_a_create_limit_are_refused() {
    let text = format!(
        "[[caller]]\nname = \"budgeted\"\nkey_sha256 = \"{}\"\nimages_per_day = 5\n\n\
         [[caller]]\nname = \"free\"\nkey_sha256 = \"{}\"\nmax_watches = 3\n",
        crate::support::hex(&crate::callers::key_hash(b"a")),
        crate::support::hex(&crate::callers::key_hash(b"b")),
    );
    let directory = Arc::new(Directory::parse(&text).expect("file"));
    let [budgeted, free] = [0, 1].map(|i| Arc::clone(&directory.callers()[i]));
    let namespace = "test".parse().expect("namespace");
    // Nothing listens on port 1: every command fails at once.
    let redis = Some(("redis://127.0.0.1:1", &namespace));
    let gate = CallerGate::new(directory, redis, false, Clock::System);
    let refused = gate.charge(&budgeted, 1).expect("on").take().await;
    assert!(
        matches!(refused, Err(Error::CallerQuotaUnavailable)),
        "fail closed: {refused:?}"
    );
    let free = gate.charge(&free, 1).expect("on").take().await;
    assert!(free.is_ok(), "no budget to hold: {free:?}");
}
